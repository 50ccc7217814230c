"""Settlement's other writes: releasing pending money, payouts, and the Kafka outboxes.

Each function is one database transaction that locks the merchant's balance rows
first (in merchant, currency order, like :class:`LedgerWriter`), so it never
deadlocks with the ledger writer, and appends cash-flow events through
:func:`append_cashflow_events` (numbered per merchant, ``posflow_cashflow`` notified).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from posflow.contracts import ISO_4217_CODES
from posflow.contracts.money import IntegrityEvent
from posflow.errors import PosflowError
from posflow.storage._ledger_tables import lock_balances, store_balances
from posflow.storage.cashflow import CashflowEvent, append_cashflow_events, pending_event

__all__ = [
    "PayoutResult",
    "mark_cashflow_published",
    "mark_integrity_published",
    "payout",
    "release_due",
    "unpublished_cashflow",
    "unpublished_integrity",
]

Conn = psycopg.Connection[tuple[Any, ...]]


def release_due(conn: Conn, now: datetime | None = None) -> list[CashflowEvent]:
    """Move applied money whose cut-off passed from pending to available.

    One ``release`` cash-flow event per (merchant, currency) with the amount moved.
    """
    now = now or datetime.now(UTC)
    with conn.transaction():
        keys = [
            (str(m), str(c).strip())
            for m, c in conn.execute(
                "SELECT DISTINCT merchant_id, currency FROM ledger_entries"
                " WHERE NOT released AND available_at <= %s",
                [now],
            ).fetchall()
        ]
        if not keys:
            return []
        balances = lock_balances(conn, keys)
        moved: dict[tuple[str, str], int] = defaultdict(int)
        for m, c, net in conn.execute(
            """
            UPDATE ledger_entries SET released = true
             WHERE NOT released AND available_at <= %s
               AND (merchant_id, currency) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
            RETURNING merchant_id, currency, net_minor
            """,
            [now, [m for m, _ in keys], [c for _, c in keys]],
        ).fetchall():
            moved[(str(m), str(c).strip())] += int(net)
        pending = []
        for key in sorted(moved):
            balances[key] = balances[key].release(moved[key])
            pending.append(
                pending_event(
                    merchant_id=key[0], kind="release", currency=key[1], amount=moved[key],
                    balance=balances[key].cashflow(), occurred_at=now,
                )
            )  # fmt: skip
        store_balances(conn, {key: balances[key] for key in moved})
        return append_cashflow_events(conn, pending)


@dataclass(frozen=True)
class PayoutResult:
    merchant_id: str
    currency: str
    amount_minor: int
    seq: int  # the payout's cash-flow event
    replayed: bool  # the key was used before: nothing moved this time
    available_minor: int
    paid_out_minor: int


def payout(
    conn: Conn, merchant_id: str, currency: str, amount_minor: int, key: str
) -> PayoutResult:
    """Move ``amount_minor`` from available to paid out, once per idempotency ``key``."""
    if currency not in ISO_4217_CODES:
        raise PosflowError(f"payout currency {currency[:8]!r} is not an ISO 4217 code",
                           fix="use an upper-case code such as EUR")  # fmt: skip
    if amount_minor <= 0:
        raise PosflowError(f"payout amount {amount_minor} must be a positive number of minor units")
    if not 1 <= len(key) <= 128:
        raise PosflowError("payout idempotency key must be 1-128 characters")
    with conn.transaction():
        balances = lock_balances(conn, [(merchant_id, currency)])
        done = conn.execute(
            "SELECT currency, amount_minor, seq FROM payouts"
            " WHERE merchant_id = %s AND idempotency_key = %s",
            [merchant_id, key],
        ).fetchone()
        bal = balances.get((merchant_id, currency))
        if done is not None:
            if (str(done[0]).strip(), int(done[1])) != (currency, amount_minor):
                raise PosflowError(
                    f"idempotency key {key!r} of merchant {merchant_id} was already used for a "
                    f"payout of {done[1]} {str(done[0]).strip()}",
                    fix="use a new key for a different payout",
                )
            return PayoutResult(
                merchant_id, currency, amount_minor, int(done[2]), True,
                bal.available if bal else 0, bal.paid_out if bal else 0,
            )  # fmt: skip
        available = bal.available if bal else 0
        if bal is None or available < amount_minor:
            raise PosflowError(
                f"payout of {amount_minor} {currency} refused: merchant {merchant_id} has "
                f"{available} {currency} available",
                fix="pay out at most the available balance (`posflow settlement release` "
                "moves pending money whose cut-off passed)",
            )
        bal = bal.pay_out(amount_minor)
        store_balances(conn, {(merchant_id, currency): bal})
        (event,) = append_cashflow_events(
            conn,
            [
                pending_event(
                    merchant_id=merchant_id, kind="payout", currency=currency,
                    amount=amount_minor, balance=bal.cashflow(), occurred_at=datetime.now(UTC),
                )
            ],
        )  # fmt: skip
        conn.execute(
            "INSERT INTO payouts (merchant_id, idempotency_key, currency, amount_minor, seq)"
            " VALUES (%s, %s, %s, %s, %s)",
            [merchant_id, key, currency, amount_minor, event.seq],
        )
        return PayoutResult(
            merchant_id, currency, amount_minor, event.seq, False, bal.available, bal.paid_out
        )


_EVENT_COLUMNS = (
    "e.merchant_id, e.seq, e.txn_id, e.kind, e.currency, e.amount_minor, e.pending_minor,"
    " e.available_minor, e.paid_out_minor, e.occurred_at, e.received_at"
)


def unpublished_cashflow(conn: Conn, limit: int = 5000) -> list[CashflowEvent]:
    """Cash-flow events after each merchant's published watermark, in seq order."""
    rows = conn.execute(
        f"""
        SELECT {_EVENT_COLUMNS}
          FROM merchant_cashflow_seq s
          LEFT JOIN cashflow_published p USING (merchant_id)
          JOIN LATERAL (
                SELECT * FROM cashflow_events x
                 WHERE x.merchant_id = s.merchant_id AND x.seq > coalesce(p.published_seq, 0)
                 ORDER BY x.seq LIMIT %s) e ON true
         WHERE s.last_seq > coalesce(p.published_seq, 0)
         ORDER BY e.merchant_id, e.seq
         LIMIT %s
        """,  # noqa: S608 - fixed column names only
        [limit, limit],
    ).fetchall()
    conn.commit()
    return [
        CashflowEvent(str(r[0]), int(r[1]), r[2], str(r[3]), str(r[4]).strip(), *r[5:])
        for r in rows
    ]


def mark_cashflow_published(conn: Conn, events: Sequence[CashflowEvent]) -> None:
    """Advance each merchant's watermark over a contiguous run Kafka acknowledged.

    A run that does not start right after the watermark (an older event is still
    unpublished) leaves it alone: the sweeper publishes from the watermark again,
    and consumers drop the repeats by (merchant_id, seq).
    """
    runs: dict[str, list[int]] = defaultdict(list)
    for ev in events:
        runs[ev.merchant_id].append(ev.seq)
    merchants, starts, ends = [], [], []
    for merchant, seqs in sorted(runs.items()):
        seqs.sort()
        if seqs != list(range(seqs[0], seqs[-1] + 1)):
            continue
        merchants.append(merchant)
        starts.append(seqs[0])
        ends.append(seqs[-1])
    if not merchants:
        return
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO cashflow_published AS p (merchant_id, published_seq)
            SELECT m, e FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(m, s, e)
             WHERE u.s = 1
            ON CONFLICT (merchant_id) DO NOTHING
            """,
            [merchants, starts, ends],
        )
        conn.execute(
            """
            UPDATE cashflow_published p SET published_seq = u.e
              FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(m, s, e)
             WHERE p.merchant_id = u.m AND p.published_seq >= u.s - 1 AND p.published_seq < u.e
            """,
            [merchants, starts, ends],
        )


def unpublished_integrity(conn: Conn, limit: int = 1000) -> list[IntegrityEvent]:
    rows = conn.execute(
        "SELECT payload::text FROM integrity_events WHERE published_at IS NULL"
        " ORDER BY created_at LIMIT %s",
        [limit],
    ).fetchall()
    conn.commit()
    return [IntegrityEvent.from_json(r[0]) for r in rows]


def mark_integrity_published(conn: Conn, event_ids: Sequence[str]) -> None:
    if not event_ids:
        return
    with conn.transaction():
        conn.execute(
            "UPDATE integrity_events SET published_at = now() WHERE event_id = ANY(%s)",
            [list(event_ids)],
        )
