"""The merchant ledger writer: exactly once per transaction id, offsets in the same commit.

One call to :meth:`LedgerWriter.write` is one database transaction (with
``synchronous_commit = on``) that

1. refuses an id already in the ledger: the same body is a duplicate (counted),
   another body goes to ``ledger_quarantine`` with an integrity event (never applied),
2. inserts one ``ledger_entries`` row per new id and decides its ``effect``
   (settlement semantics below),
3. moves the balances, appends one cash-flow event per money change, numbered per
   merchant (the number only grows), and notifies ``posflow_cashflow``,
4. stores the next Kafka offsets of the consumed partitions.

A consumer that resumes from :meth:`LedgerWriter.load_offsets` therefore neither
skips nor repeats a record (DESIGN.md principle 2).

Settlement semantics (what ``effect`` a row gets; docs/architecture.md has the table):

* only ``approved`` transactions move money; declined/error/timeout rows and preauths
  are ``no_money`` (recorded, so their ids are taken);
* sale and capture post ``net = gross - fee``; a capture needs its preauth and the
  sum of captures stays within the authorised amount;
* a refund posts ``-amount`` (the original's fee is not returned); the sum of refunds
  of an original stays within its gross; an unlinked refund within the merchant's
  captured-minus-refunded total in that currency;
* void / reversal cancel the original's whole effect once (a second is flagged);
* a child whose original is not in the ledger yet is ``parked`` and settled when the
  original arrives, in arrival order; one that breaks a rule is ``flagged``: recorded,
  not applied, with a cash-flow event (amount 0) and an integrity event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from posflow.storage._ledger_batch import UNREGISTERED_RULE, Batch
from posflow.storage._ledger_records import LedgerEntry, LedgerResult, body_sha256
from posflow.storage.cashflow import CashflowEvent, append_cashflow_events
from posflow.storage.offsets import load_offsets, store_offsets

__all__ = [
    "UNREGISTERED_RULE",
    "CashflowEvent",
    "LedgerEntry",
    "LedgerResult",
    "LedgerWriter",
    "append_cashflow_events",
    "body_sha256",
]

Conn = psycopg.Connection[tuple[Any, ...]]


class LedgerWriter:
    """Writes batches of ledger entries for one consumer group."""

    def __init__(self, conn: Conn, consumer_group: str) -> None:
        self.conn = conn
        self.group = consumer_group

    def load_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the next offset to consume, as committed with the data."""
        return load_offsets(self.conn, self.group)

    def write(
        self, entries: Sequence[LedgerEntry], offsets: Mapping[tuple[str, int], int]
    ) -> LedgerResult:
        """Apply a batch and store ``offsets`` (next offset per partition) atomically."""
        result = LedgerResult()
        with self.conn.transaction():
            self.conn.execute("SET LOCAL synchronous_commit = on")
            batch = Batch(self.conn, result)
            fresh = batch.dedupe_in_batch(entries)
            new = batch.refuse_existing(fresh)
            batch.settle(new)
            batch.flush()
            store_offsets(self.conn, self.group, offsets)
        return result
