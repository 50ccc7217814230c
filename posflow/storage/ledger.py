"""The merchant ledger writer: exactly once per transaction id, offsets in the same commit.

One call to :meth:`LedgerWriter.write` is one database transaction (with
``synchronous_commit = on``) that

1. inserts the entries whose transaction id is new (``UNIQUE (txn_id)``),
2. sets aside, in ``ledger_quarantine``, an id seen before with a different
   body (reported in the result; it never overwrites the first),
3. moves the balances and appends one cash-flow event per new entry, numbered
   per merchant (the number only grows),
4. stores the next Kafka offsets of the consumed partitions.

A consumer that resumes from :meth:`LedgerWriter.load_offsets` therefore
neither skips nor repeats a record, whatever happened between the database
commit and Kafka's own offset commit (DESIGN.md principle 2).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

__all__ = ["CashflowEvent", "LedgerEntry", "LedgerResult", "LedgerWriter", "body_sha256"]


def body_sha256(body: Mapping[str, Any]) -> str:
    """The fingerprint of a transaction body: SHA-256 of its canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
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

    @property
    def fingerprint(self) -> str:
        return body_sha256(self.body)


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


@dataclass
class LedgerResult:
    applied: int = 0
    duplicates: int = 0
    quarantined: list[str] = field(default_factory=list)  # txn ids with a conflicting body
    events: list[CashflowEvent] = field(default_factory=list)


class LedgerWriter:
    """Writes batches of ledger entries for one consumer group."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], consumer_group: str) -> None:
        self.conn = conn
        self.group = consumer_group

    def load_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the next offset to consume, as committed with the data."""
        rows = self.conn.execute(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = %s",
            [self.group],
        ).fetchall()
        self.conn.commit()
        return {(str(t), int(p)): int(o) for t, p, o in rows}

    def write(
        self, entries: Sequence[LedgerEntry], offsets: Mapping[tuple[str, int], int]
    ) -> LedgerResult:
        """Apply a batch and store ``offsets`` (next offset per partition) atomically."""
        result = LedgerResult()
        with self.conn.transaction():
            self.conn.execute("SET LOCAL synchronous_commit = on")
            fresh = self._dedupe_in_batch(entries, result)
            inserted = self._insert(fresh)
            self._check_existing([e for e in fresh if e.txn_id not in inserted], result)
            new = [e for e in fresh if e.txn_id in inserted]
            result.applied = len(new)
            result.events = self._apply_balances(new)
            self._store_offsets(offsets)
        return result

    # --- steps ------------------------------------------------------------------------

    def _dedupe_in_batch(
        self, entries: Sequence[LedgerEntry], result: LedgerResult
    ) -> list[LedgerEntry]:
        first: dict[str, LedgerEntry] = {}
        for entry in entries:
            seen = first.get(entry.txn_id)
            if seen is None:
                first[entry.txn_id] = entry
            elif seen.fingerprint == entry.fingerprint:
                result.duplicates += 1
            else:
                self._quarantine(entry, seen.fingerprint, result)
        return list(first.values())

    def _insert(self, entries: list[LedgerEntry]) -> set[str]:
        if not entries:
            return set()
        rows = self.conn.execute(
            """
            INSERT INTO ledger_entries (txn_id, merchant_id, terminal_id, txn_type, currency,
                gross_minor, fee_minor, net_minor, body_sha256, occurred_at,
                source_topic, source_partition, source_offset)
            SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::timestamptz[],
                %s::text[], %s::int[], %s::bigint[])
            ON CONFLICT (txn_id) DO NOTHING
            RETURNING txn_id
            """,
            [
                [e.txn_id for e in entries],
                [e.merchant_id for e in entries],
                [e.terminal_id for e in entries],
                [e.txn_type for e in entries],
                [e.currency for e in entries],
                [e.gross_minor for e in entries],
                [e.fee_minor for e in entries],
                [e.net_minor for e in entries],
                [e.fingerprint for e in entries],
                [e.occurred_at for e in entries],
                [e.source[0] if e.source else None for e in entries],
                [e.source[1] if e.source else None for e in entries],
                [e.source[2] if e.source else None for e in entries],
            ],
        ).fetchall()
        return {str(r[0]) for r in rows}

    def _check_existing(self, entries: list[LedgerEntry], result: LedgerResult) -> None:
        """Ids already in the ledger: a replay (same body) or a conflict (quarantined)."""
        if not entries:
            return
        stored = dict(
            self.conn.execute(
                "SELECT txn_id, body_sha256 FROM ledger_entries WHERE txn_id = ANY(%s)",
                [[e.txn_id for e in entries]],
            ).fetchall()
        )
        for entry in entries:
            if stored.get(entry.txn_id) == entry.fingerprint:
                result.duplicates += 1
            else:
                self._quarantine(entry, str(stored.get(entry.txn_id)), result)

    def _quarantine(self, entry: LedgerEntry, first: str, result: LedgerResult) -> None:
        topic, partition, offset = entry.source or (None, None, None)
        self.conn.execute(
            """
            INSERT INTO ledger_quarantine (txn_id, merchant_id, body_sha256, first_body_sha256,
                body, reason, source_topic, source_partition, source_offset)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (txn_id, body_sha256) DO NOTHING
            """,
            [
                entry.txn_id,
                entry.merchant_id,
                entry.fingerprint,
                first,
                json.dumps(dict(entry.body), default=str),
                "duplicate transaction id with a different body",
                topic,
                partition,
                offset,
            ],
        )
        result.quarantined.append(entry.txn_id)

    def _apply_balances(self, entries: list[LedgerEntry]) -> list[CashflowEvent]:
        if not entries:
            return []
        keys = sorted({(e.merchant_id, e.currency) for e in entries})
        merchants = sorted({m for m, _ in keys})
        self.conn.execute(
            """
            INSERT INTO merchant_balances (merchant_id, currency)
            SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING
            """,
            [[m for m, _ in keys], [c for _, c in keys]],
        )
        # Row locks in a fixed order: concurrent writers never deadlock on balances.
        balances: dict[tuple[str, str], list[int]] = {
            (str(m), str(c).strip()): [int(p), int(a), int(o)]
            for m, c, p, a, o in self.conn.execute(
                """
                SELECT merchant_id, currency, pending_minor, available_minor, paid_out_minor
                  FROM merchant_balances
                 WHERE (merchant_id, currency) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
                 ORDER BY merchant_id, currency
                   FOR UPDATE
                """,
                [[m for m, _ in keys], [c for _, c in keys]],
            ).fetchall()
        }
        per_merchant: dict[str, int] = defaultdict(int)
        for entry in entries:
            per_merchant[entry.merchant_id] += 1
        last_seq = dict(
            self.conn.execute(
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
        for entry in entries:
            balance = balances[(entry.merchant_id, entry.currency)]
            balance[0] += entry.net_minor  # pending until the settlement rule releases it
            seq = next_seq[entry.merchant_id]
            next_seq[entry.merchant_id] += 1
            events.append(
                CashflowEvent(
                    merchant_id=entry.merchant_id,
                    seq=seq,
                    txn_id=entry.txn_id,
                    kind=entry.txn_type,
                    currency=entry.currency,
                    amount_minor=entry.net_minor,
                    pending_minor=balance[0],
                    available_minor=balance[1],
                    paid_out_minor=balance[2],
                    occurred_at=entry.occurred_at,
                )
            )
        self.conn.execute(
            """
            UPDATE merchant_balances b SET pending_minor = u.pending, updated_at = now()
              FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS u(merchant_id, currency, pending)
             WHERE b.merchant_id = u.merchant_id AND b.currency = u.currency
            """,
            [
                [m for m, _ in keys],
                [c for _, c in keys],
                [balances[k][0] for k in keys],
            ],
        )
        with (
            self.conn.cursor() as cur,
            cur.copy(
                "COPY cashflow_events (merchant_id, seq, txn_id, kind, currency, amount_minor,"
                " pending_minor, available_minor, paid_out_minor, occurred_at) FROM STDIN"
            ) as copy,
        ):
            for ev in events:
                copy.write_row(
                    (
                        ev.merchant_id, ev.seq, ev.txn_id, ev.kind, ev.currency,
                        ev.amount_minor, ev.pending_minor, ev.available_minor,
                        ev.paid_out_minor, ev.occurred_at,
                    )
                )  # fmt: skip
        return events

    def _store_offsets(self, offsets: Mapping[tuple[str, int], int]) -> None:
        if not offsets:
            return
        items = sorted(offsets.items())
        self.conn.execute(
            """
            INSERT INTO consumer_offsets AS o (consumer_group, topic, partition, next_offset)
            SELECT %s, * FROM unnest(%s::text[], %s::int[], %s::bigint[])
            ON CONFLICT (consumer_group, topic, partition)
            DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()
            """,
            [
                self.group,
                [t for (t, _), _ in items],
                [p for (_, p), _ in items],
                [o for _, o in items],
            ],
        )
