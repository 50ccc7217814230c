"""Storage writers: telemetry rows/s (batched COPY) and ledger transactions/s.

Runs against the local stack's PostgreSQL (`posflow stack up`), in a fresh
database created for the run and dropped after it. Bounded in rows and time.

Usage:
  .venv/bin/python benchmarks/bench_storage.py --rows 200000 --batch 5000 --ledger 20000
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posflow.contracts import Accepted, IngestEnvelope, validate_message
from posflow.settings import PostgresSettings, Settings
from posflow.storage import detect_path, ensure_partitions, migrate
from posflow.storage.databases import create_database
from posflow.storage.ledger import LedgerEntry, LedgerWriter
from posflow.storage.writers import TelemetryWriter
from tests.unit import samples

TIME_LIMIT_S = 300


def _envelopes(count: int, terminals: int) -> list[IngestEnvelope]:
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        terminal = f"T-{i % terminals:05d}"
        body = samples.telemetry(
            merchant_id="M-0001",
            terminal_id=terminal,
            seq=i,
            ts=(now - timedelta(seconds=(count - i) // terminals)).isoformat(),
        )
        result = validate_message(
            f"pos/v1/M-0001/{terminal}/telemetry",
            json.dumps(body).encode(),
            received_at=now,
            mqtt_mid=i % 65535 + 1,
        )
        assert isinstance(result, Accepted)  # noqa: S101
        out.append(result.envelope)
    return out


def _ledger_entries(count: int, merchants: int) -> list[LedgerEntry]:
    now = datetime.now(UTC)
    return [
        LedgerEntry(
            txn_id=f"tx-{i}",
            merchant_id=f"M-{i % merchants:04d}",
            terminal_id=f"T-{i % (merchants * 10):05d}",
            txn_type="sale",
            currency="EUR",
            gross_minor=1000 + i % 5000,
            fee_minor=(1000 + i % 5000) // 100 + 10,
            net_minor=(1000 + i % 5000) - ((1000 + i % 5000) // 100 + 10),
            occurred_at=now,
            body={"txn_id": f"tx-{i}", "amount_minor": 1000 + i % 5000},
        )
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--terminals", type=int, default=2_000)
    parser.add_argument("--ledger", type=int, default=20_000)
    parser.add_argument("--ledger-batch", type=int, default=500)
    parser.add_argument("--merchants", type=int, default=200)
    args = parser.parse_args()

    base = Settings()
    db = f"bench_{secrets.token_hex(4)}"
    admin_dsn = base.postgres.dsn()
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        create_database(admin, db)
    pg = PostgresSettings(**{**base.postgres.model_dump(), "database": db})
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            migrate(conn)
            ensure_partitions(conn)
            path = detect_path(conn)
        print(
            f"# bench_storage {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
            f"path={path}, db={db}"
        )
        envelopes = _envelopes(args.rows, args.terminals)
        with psycopg.connect(pg.dsn()) as conn:
            writer = TelemetryWriter(conn, path)
            started = time.monotonic()
            written = 0
            for i in range(0, len(envelopes), args.batch):
                written += writer.write(envelopes[i : i + args.batch])
                if time.monotonic() - started > TIME_LIMIT_S:
                    break
            seconds = time.monotonic() - started
            replay_started = time.monotonic()
            replayed = writer.write(envelopes[: args.batch])
            replay_s = time.monotonic() - replay_started
        print(
            f"telemetry: {written} rows in {seconds:.2f} s = {written / seconds:,.0f} rows/s "
            f"(batch {args.batch}, {args.terminals} terminals, rollups "
            f"{'by writer' if path == 'plain' else 'by continuous aggregates'}); "
            f"replaying one batch inserted {replayed} rows in {replay_s * 1000:.0f} ms"
        )

        entries = _ledger_entries(args.ledger, args.merchants)
        with psycopg.connect(pg.dsn()) as conn:
            ledger = LedgerWriter(conn, consumer_group="bench")
            started = time.monotonic()
            applied = 0
            for n, i in enumerate(range(0, len(entries), args.ledger_batch)):
                result = ledger.write(
                    entries[i : i + args.ledger_batch], offsets={("pos.txn.v1", n % 6): i}
                )
                applied += result.applied
                if time.monotonic() - started > TIME_LIMIT_S:
                    break
            seconds = time.monotonic() - started
        print(
            f"ledger: {applied} transactions in {seconds:.2f} s = {applied / seconds:,.0f} txn/s "
            f"(batch {args.ledger_batch}, {args.merchants} merchants, balances + cash-flow events "
            "+ Kafka offsets in the same database transaction, synchronous_commit=on)"
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)))


if __name__ == "__main__":
    main()
