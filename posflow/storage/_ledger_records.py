"""What the ledger takes and gives back: an entry per transaction, a result per batch.

Re-exported by :mod:`posflow.storage.ledger`. A module of their own so that the batch
that settles entries (``_ledger_batch``) and the writer that runs it both import them
without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from posflow.contracts.money import IntegrityEvent
from posflow.storage.cashflow import CashflowEvent

__all__ = ["LedgerEntry", "LedgerResult", "body_sha256"]


def body_sha256(body: Mapping[str, Any]) -> str:
    """The fingerprint of a transaction body: SHA-256 of its canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """A transaction as the ledger receives it; amounts are what it posts if applied.

    Void and reversal amounts are taken from the original; refund amounts are
    normalised to ``-amount`` with no fee.
    """

    txn_id: str
    merchant_id: str
    terminal_id: str
    txn_type: str
    currency: str
    gross_minor: int
    fee_minor: int
    net_minor: int
    occurred_at: datetime
    body: Mapping[str, Any]
    source: tuple[str, int, int] | None = None  # Kafka topic, partition, offset
    status: str = "approved"
    original_txn_id: str | None = None
    received_at: datetime | None = None  # the ingest envelope's, for end-to-end latency

    @property
    def fingerprint(self) -> str:
        return body_sha256(self.body)


@dataclass
class LedgerResult:
    applied: int = 0  # new ledger rows (any effect)
    duplicates: int = 0
    quarantined: list[str] = field(default_factory=list)  # txn ids with a conflicting body
    events: list[CashflowEvent] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    parked: int = 0  # rows left waiting for their original
    integrity: list[IntegrityEvent] = field(default_factory=list)  # newly stored
