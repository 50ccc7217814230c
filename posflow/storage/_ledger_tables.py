"""The ledger's tables in SQL: ``ledger_entries`` rows and ``merchant_balances``.

Rows and balances are read ``FOR UPDATE`` (balances in merchant, currency order, so
concurrent writers never deadlock) and written back in one statement each. What
they become is decided in :mod:`posflow.storage._ledger_batch` with the pure rules
of :mod:`posflow.storage.ledger_rules`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from posflow.storage.ledger_rules import CANCELLATIONS, Balance, Payment

if TYPE_CHECKING:
    from posflow.storage._ledger_records import LedgerEntry

__all__ = [
    "Row",
    "insert_rows",
    "lock_balances",
    "select_parked_children",
    "select_rows",
    "store_balances",
    "update_rows",
]

Conn = psycopg.Connection[tuple[Any, ...]]

_ROW_COLUMNS = (
    "txn_id, merchant_id, txn_type, status, currency, gross_minor, fee_minor, net_minor,"
    " original_txn_id, effect, flag_reason, consumed_minor, cancelled_by, occurred_at,"
    " available_at, released, received_at"
)


@dataclass
class Row(Payment):
    """A ledger row while a batch is decided (new, or loaded to be updated)."""

    # ``effect`` is decided by the batch: applied, no_money, parked or flagged
    flag_reason: str | None = None
    occurred_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    available_at: datetime | None = None
    released: bool = True
    received_at: datetime | None = None
    entry: LedgerEntry | None = None  # set for rows new in this batch
    dirty: bool = False

    @classmethod
    def load(cls, r: tuple[Any, ...]) -> Row:
        return cls(
            str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]).strip(), int(r[5]), int(r[6]),
            int(r[7]), r[8], str(r[9]), int(r[11]), r[12], flag_reason=r[10], occurred_at=r[13],
            available_at=r[14], released=bool(r[15]), received_at=r[16],
        )  # fmt: skip

    @classmethod
    def new(cls, e: LedgerEntry) -> Row:
        gross, fee, net = e.gross_minor, e.fee_minor, e.net_minor
        if e.txn_type == "refund":
            gross, fee, net = -abs(gross), 0, -abs(gross)
        elif e.txn_type in CANCELLATIONS:
            gross = fee = net = 0  # the original's, once known
        return cls(
            e.txn_id, e.merchant_id, e.txn_type, e.status, e.currency, gross, fee, net,
            e.original_txn_id, occurred_at=e.occurred_at, received_at=e.received_at, entry=e,
        )  # fmt: skip


def select_rows(conn: Conn, ids: Iterable[str]) -> list[Row]:
    """The ledger rows with these transaction ids, locked."""
    return [
        Row.load(r)
        for r in conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger_entries WHERE txn_id = ANY(%s) FOR UPDATE",  # noqa: S608
            [sorted(ids)],
        ).fetchall()
    ]


def select_parked_children(conn: Conn, originals: Sequence[str]) -> list[Row]:
    """The rows parked for these originals, locked, in arrival order."""
    return [
        Row.load(r)
        for r in conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger_entries"  # noqa: S608
            " WHERE effect = 'parked' AND original_txn_id = ANY(%s) ORDER BY entry_id FOR UPDATE",
            [list(originals)],
        ).fetchall()
    ]


def insert_rows(conn: Conn, rows: Sequence[Row]) -> None:
    """Insert rows new in this batch (each has its ``entry``)."""
    entries = [r.entry for r in rows if r.entry is not None]
    conn.execute(
        """
        INSERT INTO ledger_entries (txn_id, merchant_id, terminal_id, txn_type, currency,
            gross_minor, fee_minor, net_minor, body_sha256, occurred_at,
            source_topic, source_partition, source_offset, status, original_txn_id,
            effect, flag_reason, consumed_minor, cancelled_by, available_at, released,
            received_at)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::timestamptz[],
            %s::text[], %s::int[], %s::bigint[], %s::text[], %s::text[],
            %s::text[], %s::text[], %s::bigint[], %s::text[], %s::timestamptz[], %s::bool[],
            %s::timestamptz[])
        """,
        [
            [r.txn_id for r in rows],
            [r.merchant_id for r in rows],
            [e.terminal_id for e in entries],
            [r.txn_type for r in rows],
            [r.currency for r in rows],
            [r.gross for r in rows],
            [r.fee for r in rows],
            [r.net for r in rows],
            [e.fingerprint for e in entries],
            [r.occurred_at for r in rows],
            [e.source[0] if e.source else None for e in entries],
            [e.source[1] if e.source else None for e in entries],
            [e.source[2] if e.source else None for e in entries],
            [r.status for r in rows],
            [r.original_txn_id for r in rows],
            [r.effect for r in rows],
            [r.flag_reason for r in rows],
            [r.consumed for r in rows],
            [r.cancelled_by for r in rows],
            [r.available_at for r in rows],
            [r.released for r in rows],
            [r.received_at for r in rows],
        ],
    )


def update_rows(conn: Conn, rows: Sequence[Row]) -> None:
    """Write back what a batch changed on rows stored before it."""
    conn.execute(
        """
        UPDATE ledger_entries l SET gross_minor = u.gross, fee_minor = u.fee,
               net_minor = u.net, effect = u.effect, flag_reason = u.flag_reason,
               consumed_minor = u.consumed, cancelled_by = u.cancelled_by,
               available_at = u.available_at, released = u.released
          FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[],
                      %s::text[], %s::bigint[], %s::text[], %s::timestamptz[], %s::bool[])
               AS u(txn_id, gross, fee, net, effect, flag_reason, consumed, cancelled_by,
                    available_at, released)
         WHERE l.txn_id = u.txn_id
        """,
        [
            [r.txn_id for r in rows], [r.gross for r in rows], [r.fee for r in rows],
            [r.net for r in rows], [r.effect for r in rows], [r.flag_reason for r in rows],
            [r.consumed for r in rows], [r.cancelled_by for r in rows],
            [r.available_at for r in rows], [r.released for r in rows],
        ],
    )  # fmt: skip


def lock_balances(
    conn: Conn, keys: Iterable[tuple[str, str]], *, create: bool = False
) -> dict[tuple[str, str], Balance]:
    """Lock the (merchant, currency) balances that exist (``create``: all of them).

    Row locks in a fixed order: concurrent writers never deadlock on balances.
    """
    ordered = sorted(set(keys))
    merchants, currencies = [m for m, _ in ordered], [c for _, c in ordered]
    if create:
        conn.execute(
            """
            INSERT INTO merchant_balances (merchant_id, currency)
            SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING
            """,
            [merchants, currencies],
        )
    rows = conn.execute(
        """
        SELECT merchant_id, currency, pending_minor, available_minor, paid_out_minor,
               captured_minor, refunded_minor
          FROM merchant_balances
         WHERE (merchant_id, currency) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
         ORDER BY merchant_id, currency
           FOR UPDATE
        """,
        [merchants, currencies],
    ).fetchall()
    balances = {}
    for m, c, p, a, o, cap, ref in rows:
        currency = str(c).strip()
        balances[(str(m), currency)] = Balance(
            currency, pending=int(p), available=int(a), paid_out=int(o),
            captured=int(cap), refunded=int(ref),
        )  # fmt: skip
    return balances


def store_balances(conn: Conn, balances: Mapping[tuple[str, str], Balance]) -> None:
    """Write back balances locked by :func:`lock_balances` (by merchant, currency)."""
    keys = sorted(balances)
    if not keys:
        return
    conn.execute(
        """
        UPDATE merchant_balances b SET pending_minor = u.p, available_minor = u.a,
               paid_out_minor = u.o, captured_minor = u.cap, refunded_minor = u.ref,
               updated_at = now()
          FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[],
                      %s::bigint[], %s::bigint[]) AS u(merchant_id, currency, p, a, o, cap, ref)
         WHERE b.merchant_id = u.merchant_id AND b.currency = u.currency
        """,
        [
            [m for m, _ in keys], [c for _, c in keys],
            [balances[k].pending for k in keys], [balances[k].available for k in keys],
            [balances[k].paid_out for k in keys], [balances[k].captured for k in keys],
            [balances[k].refunded for k in keys],
        ],
    )  # fmt: skip
