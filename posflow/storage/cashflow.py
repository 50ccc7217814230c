"""Cash-flow events: numbered per merchant, stored, notified; and the integrity outbox.

Every change of a merchant's money appends one ``cashflow_events`` row with the next
``seq`` of that merchant (allocated under the row lock of ``merchant_cashflow_seq``,
so it only grows and has no gaps) and, in the same transaction, notifies channel
``posflow_cashflow`` once per merchant (the merchant API LISTENs there).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from posflow.contracts.money import CashflowRecord, IntegrityEvent

__all__ = [
    "NOTIFY_CHANNEL",
    "CashflowEvent",
    "PendingEvent",
    "append_cashflow_events",
    "pending_event",
    "store_integrity_events",
]

Conn = psycopg.Connection[tuple[Any, ...]]

NOTIFY_CHANNEL = "posflow_cashflow"


@dataclass(frozen=True)
class CashflowEvent:
    merchant_id: str
    seq: int
    txn_id: str | None
    kind: str
    currency: str
    amount_minor: int
    pending_minor: int
    available_minor: int
    paid_out_minor: int
    occurred_at: datetime
    received_at: datetime | None = None

    def record(self) -> CashflowRecord:
        """The ``pos.cashflow.v1`` record of this event."""
        return CashflowRecord(
            merchant_id=self.merchant_id, seq=self.seq, txn_id=self.txn_id, kind=self.kind,
            currency=self.currency.strip(), amount_minor=self.amount_minor,
            pending_minor=self.pending_minor, available_minor=self.available_minor,
            paid_out_minor=self.paid_out_minor, occurred_at=self.occurred_at,
        )  # fmt: skip


@dataclass
class PendingEvent:
    """A cash-flow event before its sequence number is allocated."""

    merchant_id: str
    txn_id: str | None
    kind: str
    currency: str
    amount: int
    balance: tuple[int, int, int]
    occurred_at: datetime
    received_at: datetime | None


def append_cashflow_events(conn: Conn, pending: Sequence[PendingEvent]) -> list[CashflowEvent]:
    """Number the events per merchant, store them and notify ``posflow_cashflow``.

    Call inside the transaction that changed the balances (rows locked).
    """
    if not pending:
        return []
    per_merchant: dict[str, int] = defaultdict(int)
    for p in pending:
        per_merchant[p.merchant_id] += 1
    merchants = sorted(per_merchant)
    last_seq: dict[str, int] = dict(
        conn.execute(
            """
            INSERT INTO merchant_cashflow_seq AS s (merchant_id, last_seq)
            SELECT * FROM unnest(%s::text[], %s::bigint[])
            ON CONFLICT (merchant_id) DO UPDATE SET last_seq = s.last_seq + excluded.last_seq
            RETURNING merchant_id, last_seq
            """,
            [merchants, [per_merchant[m] for m in merchants]],
        ).fetchall()
    )
    next_seq = {m: int(last_seq[m]) - per_merchant[m] + 1 for m in merchants}
    events = []
    for p in pending:
        seq = next_seq[p.merchant_id]
        next_seq[p.merchant_id] += 1
        events.append(
            CashflowEvent(
                p.merchant_id, seq, p.txn_id, p.kind, p.currency, p.amount,
                p.balance[0], p.balance[1], p.balance[2], p.occurred_at, p.received_at,
            )
        )  # fmt: skip
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY cashflow_events (merchant_id, seq, txn_id, kind, currency, amount_minor,"
            " pending_minor, available_minor, paid_out_minor, occurred_at, received_at)"
            " FROM STDIN"
        ) as copy,
    ):
        for ev in events:
            copy.write_row(
                (
                    ev.merchant_id, ev.seq, ev.txn_id, ev.kind, ev.currency,
                    ev.amount_minor, ev.pending_minor, ev.available_minor,
                    ev.paid_out_minor, ev.occurred_at, ev.received_at,
                )
            )  # fmt: skip
    # The merchant API LISTENs here and reads cashflow_events after its last seq.
    conn.execute(
        "SELECT pg_notify(%s, m) FROM unnest(%s::text[]) AS m", [NOTIFY_CHANNEL, merchants]
    )
    return events


def store_integrity_events(conn: Conn, events: Sequence[IntegrityEvent]) -> list[IntegrityEvent]:
    """Put integrity events in their outbox; returns those not stored before."""
    if not events:
        return []
    stored = {
        str(r[0])
        for r in conn.execute(
            """
            INSERT INTO integrity_events (event_id, merchant_id, kind, payload)
            SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[])
            ON CONFLICT (event_id) DO NOTHING RETURNING event_id
            """,
            [
                [e.event_id for e in events],
                [e.merchant_id for e in events],
                [e.kind for e in events],
                [e.to_json().decode() for e in events],
            ],
        ).fetchall()
    }
    return [e for e in events if e.event_id in stored]


def pending_event(
    *,
    merchant_id: str,
    kind: str,
    currency: str,
    amount: int,
    balance: Sequence[int],
    occurred_at: datetime,
) -> PendingEvent:
    """A cash-flow event without a transaction (release, payout) for append_cashflow_events."""
    return PendingEvent(
        merchant_id, None, kind, currency, amount, (balance[0], balance[1], balance[2]),
        occurred_at, None,
    )  # fmt: skip
