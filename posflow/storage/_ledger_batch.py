"""The decisions of one ledger write: which effect each new row has, and what it moves.

Used by :class:`posflow.storage.ledger.LedgerWriter` inside its transaction; the
semantics are in that module's docstring and in docs/architecture.md (Settlement).
The rules themselves are pure (:mod:`posflow.storage.ledger_rules`); this module
loads what they need, applies what they decide, and writes it back
(:mod:`posflow.storage._ledger_tables`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from posflow.contracts.money import IntegrityEvent, IntegrityKind, SettlementRule
from posflow.storage._ledger_tables import (
    Row,
    insert_rows,
    lock_balances,
    select_parked_children,
    select_rows,
    store_balances,
    update_rows,
)
from posflow.storage.cashflow import PendingEvent, append_cashflow_events, store_integrity_events
from posflow.storage.ledger_rules import (
    Arrival,
    Balance,
    Effect,
    arrival,
    decide,
    needs_original,
    post,
)

if TYPE_CHECKING:
    from posflow.storage._ledger_records import LedgerEntry, LedgerResult

__all__ = ["UNREGISTERED_RULE", "Batch"]

log = logging.getLogger("posflow.storage")

Conn = psycopg.Connection[tuple[Any, ...]]

# A merchant without a row in `merchants`: its money waits for the next midnight UTC.
UNREGISTERED_RULE = SettlementRule(kind="daily", cutoff="00:00", timezone="UTC")


class Batch:
    """The state of one write: rows, balances, events; flushed at the end."""

    def __init__(self, conn: Conn, result: LedgerResult) -> None:
        self.conn = conn
        self.result = result
        self.rows: dict[str, Row] = {}  # new and loaded rows by txn id
        self.missing: set[str] = set()  # ids known not to be in the ledger
        self.waiting: dict[str, list[Row]] = defaultdict(list)  # original id -> parked children
        self.children_loaded: set[str] = set()
        self.balances: dict[tuple[str, str], Balance] = {}  # by (merchant, currency)
        self.touched: set[tuple[str, str]] = set()
        self.rules: dict[str, tuple[SettlementRule, str]] = {}
        self.pending_events: list[PendingEvent] = []
        self.integrity: list[IntegrityEvent] = []

    # --- duplicates and conflicts ----------------------------------------------------

    def dedupe_in_batch(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        first: dict[str, LedgerEntry] = {}
        for entry in entries:
            seen = first.get(entry.txn_id)
            if self._is_new(entry, seen.fingerprint if seen else None):
                first[entry.txn_id] = entry
        return list(first.values())

    def refuse_existing(self, entries: list[LedgerEntry]) -> list[LedgerEntry]:
        if not entries:
            return []
        # Lock the merchants first (balance rows, fixed order): one writer per merchant at
        # a time, and the same lock order as payouts and releases.
        self._lock_balances({(e.merchant_id, e.currency) for e in entries})
        stored: dict[str, str] = dict(
            self.conn.execute(
                "SELECT txn_id, body_sha256 FROM ledger_entries WHERE txn_id = ANY(%s)",
                [[e.txn_id for e in entries]],
            ).fetchall()
        )
        return [e for e in entries if self._is_new(e, stored.get(e.txn_id))]

    def _is_new(self, entry: LedgerEntry, first_fingerprint: str | None) -> bool:
        """Count a duplicate, quarantine a conflicting body; true for an id not seen yet."""
        seen = arrival(first_fingerprint, entry.fingerprint)
        if seen is Arrival.DUPLICATE:
            self.result.duplicates += 1
        elif seen is Arrival.CONFLICT:
            self._quarantine(entry, str(first_fingerprint))
        return seen is Arrival.NEW

    def _quarantine(self, entry: LedgerEntry, first: str) -> None:
        topic, partition, offset = entry.source or (None, None, None)
        self.conn.execute(
            """
            INSERT INTO ledger_quarantine (txn_id, merchant_id, body_sha256, first_body_sha256,
                body, reason, source_topic, source_partition, source_offset)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (txn_id, body_sha256) DO NOTHING
            """,
            [
                entry.txn_id, entry.merchant_id, entry.fingerprint, first,
                json.dumps(dict(entry.body), default=str),
                "duplicate transaction id with a different body", topic, partition, offset,
            ],
        )  # fmt: skip
        self.result.quarantined.append(entry.txn_id)
        self.integrity.append(
            IntegrityEvent(
                event_id=f"txn_id_conflict:{entry.txn_id}:{entry.fingerprint[:16]}",
                kind="txn_id_conflict", severity="critical", merchant_id=entry.merchant_id,
                txn_id=entry.txn_id, currency=entry.currency, amount_minor=entry.gross_minor,
                body_sha256=entry.fingerprint, first_body_sha256=first,
                source_topic=topic, source_partition=partition, source_offset=offset,
                message=f"transaction id {entry.txn_id} arrived again with a different body: "
                "quarantined, the ledger keeps the first",
                detected_at=datetime.now(UTC),
            )
        )  # fmt: skip

    # --- settlement --------------------------------------------------------------------

    def settle(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        for entry in entries:
            self.rows[entry.txn_id] = Row.new(entry)
        self._load_rules({e.merchant_id for e in entries})
        wanted = {e.original_txn_id for e in entries if e.original_txn_id} - set(self.rows)
        self._load_rows(wanted)
        self._load_children([e.txn_id for e in entries])
        for entry in entries:
            self._decide(self.rows[entry.txn_id])
        self.result.applied = len(entries)
        self.result.parked = sum(
            1 for r in self.rows.values() if r.effect == "parked" and (r.entry or r.dirty)
        )

    def _decide(self, row: Row) -> None:
        orig_id = row.original_txn_id
        orig = self._row(orig_id) if orig_id is not None and needs_original(row) else None
        # Locked already: new rows' balances by refuse_existing, a woken child's with the
        # original it shares them with (or on the way to being flagged).
        balance = self._balance(row.merchant_id, row.currency)
        decision = decide(row, balance, orig)
        if decision.effect is Effect.PARKED and orig_id is not None:
            row.effect = Effect.PARKED.value
            self.waiting[orig_id].append(row)
            return  # settled when its original is
        if orig is not None and decision.cancels:
            orig.cancelled_by, orig.dirty = row.txn_id, True
        if orig is not None and decision.consumes is not None:
            orig.consumed, orig.dirty = orig.consumed + decision.consumes, True
        if decision.amounts is not None:
            row.gross, row.fee, row.net = decision.amounts
        if decision.reason is not None:
            self._flag(row, decision.reason, decision.message)
        elif decision.effect is Effect.APPLIED:
            self._apply(row, cancels=orig if decision.cancels else None)
        else:
            row.effect, row.dirty = Effect.NO_MONEY.value, True
        self._wake(row.txn_id)

    def _apply(self, row: Row, cancels: Row | None = None) -> None:
        row.effect, row.dirty = Effect.APPLIED.value, True
        rule, zone = self.rules.get(row.merchant_id) or self._rule(row.merchant_id)
        row.available_at = rule.available_at(row.occurred_at, zone)
        row.released = rule.kind == "instant"
        key = (row.merchant_id, row.currency)
        self.balances[key] = post(self._balance(*key), row, instant=row.released, cancelled=cancels)
        if cancels is not None and cancels.original_txn_id:
            # The cancelled refund/capture no longer counts against its own original.
            parent = self._row(cancels.original_txn_id)
            if parent is not None:
                parent.consumed, parent.dirty = parent.consumed - abs(cancels.gross), True
        self._event(row, row.txn_type, row.net)

    def _flag(self, row: Row, kind: IntegrityKind, message: str) -> None:
        row.effect, row.flag_reason, row.dirty = Effect.FLAGGED.value, kind, True
        self.result.flagged.append(row.txn_id)
        self._event(row, "flagged", 0)
        source = row.entry.source if row.entry and row.entry.source else (None, None, None)
        self.integrity.append(
            IntegrityEvent(
                event_id=f"{kind}:{row.txn_id}", kind=kind, severity="warning",
                merchant_id=row.merchant_id, txn_id=row.txn_id,
                original_txn_id=row.original_txn_id, currency=row.currency,
                amount_minor=abs(row.gross), source_topic=source[0],
                source_partition=source[1], source_offset=source[2],
                message=f"{row.txn_type} {row.txn_id} recorded, not applied: {message}",
                detected_at=datetime.now(UTC),
            )
        )  # fmt: skip

    def _event(self, row: Row, kind: str, amount: int) -> None:
        balance = self._balance(row.merchant_id, row.currency)
        self.touched.add((row.merchant_id, row.currency))
        self.pending_events.append(
            PendingEvent(
                row.merchant_id, row.txn_id, kind, row.currency, amount,
                balance.cashflow(), row.occurred_at, row.received_at,
            )
        )  # fmt: skip

    def _wake(self, txn_id: str) -> None:
        """Settle, in arrival order, the children that waited for ``txn_id``."""
        if txn_id not in self.children_loaded:
            self._load_children([txn_id])
        for child in self.waiting.pop(txn_id, []):
            self._decide(child)

    # --- loading ---------------------------------------------------------------------------

    def _row(self, txn_id: str) -> Row | None:
        if txn_id not in self.rows and txn_id not in self.missing:
            self._load_rows({txn_id})
        return self.rows.get(txn_id)

    def _load_rows(self, ids: set[str]) -> None:
        if not ids:
            return
        for row in select_rows(self.conn, ids):
            self.rows[row.txn_id] = row
        self.missing |= ids - set(self.rows)

    def _load_children(self, ids: list[str]) -> None:
        ids = [i for i in ids if i not in self.children_loaded]
        if not ids:
            return
        self.children_loaded.update(ids)
        found: dict[str, list[Row]] = defaultdict(list)
        for loaded in select_parked_children(self.conn, ids):
            original = str(loaded.original_txn_id)
            row = self.rows.setdefault(loaded.txn_id, loaded)  # maybe loaded as an original
            queued = {w.txn_id for w in self.waiting.get(original, [])}
            if row.entry is None and row.effect == Effect.PARKED and row.txn_id not in queued:
                found[original].append(row)
        # Children parked in earlier batches arrived before those parked in this one.
        for txn_id, rows in found.items():
            self.waiting[txn_id] = rows + self.waiting.get(txn_id, [])

    def _load_rules(self, merchants: set[str]) -> None:
        missing = sorted(merchants - set(self.rules))
        if not missing:
            return
        for merchant, rule, zone in self.conn.execute(
            "SELECT merchant_id, settlement_rule, timezone FROM merchants"
            " WHERE merchant_id = ANY(%s)",
            [missing],
        ).fetchall():
            try:
                parsed = SettlementRule.from_json(json.dumps(rule))
            except ValueError as exc:
                log.error(  # noqa: TRY400 - the reason is the message; no traceback needed
                    "merchant %s: invalid settlement_rule (%s); money stays pending until "
                    "the next midnight UTC", merchant, exc,
                )  # fmt: skip
                parsed = UNREGISTERED_RULE
            self.rules[str(merchant)] = (parsed, str(zone))
        for merchant in missing:
            self.rules.setdefault(merchant, (UNREGISTERED_RULE, "UTC"))

    def _rule(self, merchant: str) -> tuple[SettlementRule, str]:
        self._load_rules({merchant})
        return self.rules[merchant]

    def _lock_balances(self, keys: set[tuple[str, str]]) -> None:
        keys = {k for k in keys if k not in self.balances}
        if keys:
            self.balances.update(lock_balances(self.conn, keys, create=True))

    def _balance(self, merchant: str, currency: str) -> Balance:
        if (merchant, currency) not in self.balances:
            self._lock_balances({(merchant, currency)})
        return self.balances[(merchant, currency)]

    # --- writing -----------------------------------------------------------------------------

    def flush(self) -> None:
        new = [r for r in self.rows.values() if r.entry is not None]
        old = [r for r in self.rows.values() if r.entry is None and r.dirty]
        if new:
            insert_rows(self.conn, new)
        if old:
            update_rows(self.conn, old)
        store_balances(self.conn, {k: self.balances[k] for k in self.touched})
        self.result.events = append_cashflow_events(self.conn, self.pending_events)
        self.result.integrity = store_integrity_events(self.conn, self.integrity)
