"""The raw sink's database side: its one connection with its writers, and writing a
batch so that a record the database refuses is isolated instead of failing the batch.

One connection, not a pool: the writers keep per-session state (their staging temp
tables, created once per connection), the sink writes one batch at a time, and the
WAL positions it reads must come from the server it wrote to. A failed write closes
the connection; the next attempt (after the sink's backoff) opens a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from posflow.contracts.internal import DecodedEnvelope
from posflow.storage.migrate import StoragePath
from posflow.storage.writers import TelemetryWriter, TransactionWriter

__all__ = ["RECORD_FAULTS", "Refused", "SinkDatabase", "write_isolating"]

# What the database says about one record's data (as opposed to an outage).
RECORD_FAULTS = (psycopg.DataError, psycopg.IntegrityError)

# Envelopes the database refused, with its words.
Refused = list[tuple[DecodedEnvelope, str]]


class SinkDatabase:
    """The sink's connection and writers; rebuilt after any failed write.

    A new writer per connection also resets the writers' staging-table flag, which a
    rolled-back first write would otherwise leave pointing at a table that is gone.
    """

    def __init__(self, dsn: str, path: StoragePath) -> None:
        self.dsn = dsn
        self.path = path
        self.conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self.telemetry: TelemetryWriter
        self.transactions: TransactionWriter

    def connect(self) -> None:
        self.close()
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.telemetry = TelemetryWriter(self.conn, self.path)
        self.transactions = TransactionWriter(self.conn, self.path)

    def ensure_connected(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self.conn is None or self.conn.closed:
            self.connect()
        assert self.conn is not None  # noqa: S101 - connect() sets it
        return self.conn

    def reset_writers(self) -> None:
        if self.conn is None or self.conn.closed:
            self.connect()
            return
        self.telemetry = TelemetryWriter(self.conn, self.path)
        self.transactions = TransactionWriter(self.conn, self.path)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def wal_insert_lsn(self) -> int:
        assert self.conn is not None  # noqa: S101 - connect() runs first
        row = self.conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8").fetchone()
        return int(row[0]) if row else 0

    def wal_flush_lsn(self) -> int:
        conn = self.ensure_connected()
        row = conn.execute("SELECT (pg_current_wal_flush_lsn() - '0/0')::int8").fetchone()
        return int(row[0]) if row else 0


def write_isolating(
    write: Callable[[Sequence[DecodedEnvelope]], int],
    envelopes: Sequence[DecodedEnvelope],
    refused: Refused,
    db: SinkDatabase,
) -> int:
    """Write ``envelopes``; if the database refuses the batch for its data, halve it until
    each refused record is alone (it lands in ``refused`` with the database's words).
    Returns the rows inserted."""
    if not envelopes:
        return 0
    try:
        return write(envelopes)
    except RECORD_FAULTS as exc:
        db.reset_writers()
        if len(envelopes) == 1:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            refused.append((envelopes[0], f"{type(exc).__name__}: {detail}"))
            return 0
    half = len(envelopes) // 2
    first = write_isolating(write, envelopes[:half], refused, db)
    return first + write_isolating(write, envelopes[half:], refused, db)
