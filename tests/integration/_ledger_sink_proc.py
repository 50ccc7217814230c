"""A ledger sink process for the crash test.

Run as ``python -m tests.integration._ledger_sink_proc``.

Arguments: bootstrap topic group dsn expected_total [--hang-after-first-commit MARKER]
With the flag, it stops dead right after its first database commit, before
the Kafka offset commit, and writes MARKER so the test knows when to SIGKILL it.
Otherwise it consumes until ``expected_total`` records are applied (or 60 s)
and prints a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aiokafka.structs import ConsumerRecord

from posflow.contracts import IngestEnvelope, Transaction
from posflow.storage.ledger import LedgerEntry, LedgerResult
from posflow.storage.sink import LedgerSink


def to_entries(records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[LedgerEntry]:
    entries = []
    for record in records:
        assert record.value is not None
        envelope = IngestEnvelope.from_json(record.value)
        txn = envelope.payload
        assert isinstance(txn, Transaction)
        gross = txn.amount_minor + txn.tip_minor
        entries.append(
            LedgerEntry(
                txn_id=txn.txn_id,
                merchant_id=txn.merchant_id,
                terminal_id=txn.terminal_id,
                txn_type=txn.type,
                currency=txn.currency,
                gross_minor=gross,
                fee_minor=0,
                net_minor=gross,
                occurred_at=txn.ts,
                body=txn.model_dump(mode="json"),
                source=(record.topic, record.partition, record.offset),
            )
        )
    return entries


async def main(argv: list[str]) -> None:
    bootstrap, topic, group, dsn, expected = argv[:5]
    marker = Path(argv[6]) if len(argv) > 6 and argv[5] == "--hang-after-first-commit" else None
    totals = {"applied": 0, "duplicates": 0, "quarantined": 0, "batches": 0}

    def after_db_commit(result: LedgerResult) -> None:
        totals["applied"] += result.applied
        totals["duplicates"] += result.duplicates
        totals["quarantined"] += len(result.quarantined)
        totals["batches"] += 1
        if marker is not None:
            marker.write_text(json.dumps(totals))
            time.sleep(3600)  # committed to the database, not yet to Kafka: killed here

    sink = LedgerSink(
        bootstrap=bootstrap,
        topic=topic,
        group=group,
        dsn=dsn,
        to_entries=to_entries,
        max_records=100,
        after_db_commit=after_db_commit,
    )
    await sink.start()
    deadline = time.monotonic() + 60
    try:
        while totals["applied"] + totals["duplicates"] < int(expected):
            if time.monotonic() > deadline:
                break
            await sink.run_once(timeout_ms=500)
    finally:
        await sink.stop()
    print(json.dumps(totals))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
