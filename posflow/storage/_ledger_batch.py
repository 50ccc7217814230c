"""The decisions of one ledger write: which effect each new row has, and what it moves.

Used by :class:`posflow.storage.ledger.LedgerWriter` inside its transaction; the
semantics are in that module's docstring and in docs/architecture.md (Settlement).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from posflow.contracts.money import IntegrityEvent, IntegrityKind, SettlementRule
from posflow.storage.cashflow import PendingEvent, append_cashflow_events, store_integrity_events

if TYPE_CHECKING:
    from posflow.storage._ledger_records import LedgerEntry, LedgerResult

__all__ = ["UNREGISTERED_RULE", "Batch"]

log = logging.getLogger("posflow.storage")

Conn = psycopg.Connection[tuple[Any, ...]]

# A merchant without a row in `merchants`: its money waits for the next midnight UTC.
UNREGISTERED_RULE = SettlementRule(kind="daily", cutoff="00:00", timezone="UTC")

_ROW_COLUMNS = (
    "txn_id, merchant_id, txn_type, status, currency, gross_minor, fee_minor, net_minor,"
    " original_txn_id, effect, flag_reason, consumed_minor, cancelled_by, occurred_at,"
    " available_at, released, received_at"
)


@dataclass
class _Row:
    """A ledger row while a batch is decided (new, or loaded to be updated)."""

    txn_id: str
    merchant_id: str
    txn_type: str
    status: str
    currency: str
    gross: int
    fee: int
    net: int
    original_txn_id: str | None
    effect: str = ""  # decided by the batch: applied, no_money, parked or flagged
    flag_reason: str | None = None
    consumed: int = 0
    cancelled_by: str | None = None
    occurred_at: datetime = datetime(1970, 1, 1, tzinfo=UTC)
    available_at: datetime | None = None
    released: bool = True
    received_at: datetime | None = None
    entry: LedgerEntry | None = None  # set for rows new in this batch
    dirty: bool = False

    @classmethod
    def load(cls, r: tuple[Any, ...]) -> _Row:
        return cls(
            str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]).strip(), int(r[5]), int(r[6]),
            int(r[7]), r[8], str(r[9]), r[10], int(r[11]), r[12], r[13], r[14], bool(r[15]), r[16],
        )  # fmt: skip

    @classmethod
    def new(cls, e: LedgerEntry) -> _Row:
        gross, fee, net = e.gross_minor, e.fee_minor, e.net_minor
        if e.txn_type == "refund":
            gross, fee, net = -abs(gross), 0, -abs(gross)
        elif e.txn_type in ("void", "reversal"):
            gross = fee = net = 0  # the original's, once known
        return cls(
            e.txn_id, e.merchant_id, e.txn_type, e.status, e.currency, gross, fee, net,
            e.original_txn_id, occurred_at=e.occurred_at, received_at=e.received_at, entry=e,
        )  # fmt: skip


class Batch:
    """The state of one write: rows, balances, events; flushed at the end."""

    def __init__(self, conn: Conn, result: LedgerResult) -> None:
        self.conn = conn
        self.result = result
        self.rows: dict[str, _Row] = {}  # new and loaded rows by txn id
        self.missing: set[str] = set()  # ids known not to be in the ledger
        self.waiting: dict[str, list[_Row]] = defaultdict(list)  # original id -> parked children
        self.children_loaded: set[str] = set()
        # (merchant, currency) -> [pending, available, paid_out, captured, refunded]
        self.balances: dict[tuple[str, str], list[int]] = {}
        self.touched: set[tuple[str, str]] = set()
        self.rules: dict[str, tuple[SettlementRule, str]] = {}
        self.pending_events: list[PendingEvent] = []
        self.integrity: list[IntegrityEvent] = []

    # --- duplicates and conflicts ----------------------------------------------------

    def dedupe_in_batch(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        first: dict[str, LedgerEntry] = {}
        for entry in entries:
            seen = first.get(entry.txn_id)
            if seen is None:
                first[entry.txn_id] = entry
            elif seen.fingerprint == entry.fingerprint:
                self.result.duplicates += 1
            else:
                self._quarantine(entry, seen.fingerprint)
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
        new = []
        for entry in entries:
            if entry.txn_id not in stored:
                new.append(entry)
            elif stored[entry.txn_id] == entry.fingerprint:
                self.result.duplicates += 1
            else:
                self._quarantine(entry, str(stored[entry.txn_id]))
        return new

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
            self.rows[entry.txn_id] = _Row.new(entry)
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

    def _decide(self, row: _Row) -> None:
        t = row.txn_type
        if row.status != "approved":
            self._no_money(row)
        elif t == "sale":
            self._apply(row)
        elif t == "preauth":
            self._no_money(row)
        elif t == "refund" and row.original_txn_id is None:
            bal = self._balance(row.merchant_id, row.currency)
            if bal[4] - row.gross <= bal[3]:
                self._apply(row)
            else:
                self._flag(
                    row, "refund_exceeds_captured",
                    f"unlinked refund of {-row.gross} exceeds the merchant's captured minus "
                    f"refunded {bal[3] - bal[4]} {row.currency}",
                )  # fmt: skip
        elif row.original_txn_id is not None:
            orig = self._row(row.original_txn_id)
            # "" = later in this batch, not decided yet: it has not arrived for this row
            if orig is None or orig.effect in ("parked", ""):
                row.effect = "parked"
                self.waiting[row.original_txn_id].append(row)
                return  # settled when its original is
            self._child(row, orig)
        else:  # the contract requires an original for these; refuse rather than guess
            self._flag(row, "original_invalid", f"a {row.txn_type} needs original_txn_id")
        self._wake(row.txn_id)

    def _child(self, row: _Row, orig: _Row) -> None:  # noqa: PLR0911 - one rule per return
        t = row.txn_type
        if orig.merchant_id != row.merchant_id or orig.currency != row.currency:
            return self._flag(
                row, "original_invalid",
                f"original {orig.txn_id} belongs to {orig.merchant_id}/{orig.currency}",
            )  # fmt: skip
        if t in ("void", "reversal"):
            if orig.txn_type in ("void", "reversal"):
                return self._flag(row, "original_invalid", f"{orig.txn_id} is itself a {t}")
            if orig.cancelled_by is not None:
                return self._flag(
                    row, "original_invalid", f"{orig.txn_id} already cancelled by "
                    f"{orig.cancelled_by}",
                )  # fmt: skip
            if orig.consumed > 0:
                return self._flag(
                    row, "original_invalid",
                    f"{orig.txn_id} has {orig.consumed} refunded/captured against it: "
                    "cancel those first",
                )  # fmt: skip
            orig.cancelled_by, orig.dirty = row.txn_id, True
            if orig.effect != "applied":
                return self._no_money(row)  # nothing moved: nothing to give back
            row.gross, row.fee, row.net = -orig.gross, -orig.fee, -orig.net
            self._apply(row, cancels=orig)
            return None
        if t == "capture":
            if orig.txn_type != "preauth":
                return self._flag(row, "original_invalid", f"{orig.txn_id} is not a preauth")
            authorised = orig.gross if orig.status == "approved" and not orig.cancelled_by else 0
            if orig.consumed + row.gross > authorised:
                return self._flag(
                    row, "capture_exceeds_authorized",
                    f"capture of {row.gross} + {orig.consumed} captured exceeds the "
                    f"{authorised} authorised by {orig.txn_id}",
                )  # fmt: skip
            orig.consumed, orig.dirty = orig.consumed + row.gross, True
            return self._apply(row)
        # a linked refund
        if orig.txn_type not in ("sale", "capture"):
            return self._flag(row, "original_invalid", f"{orig.txn_id} is a {orig.txn_type}")
        captured = orig.gross if orig.effect == "applied" and not orig.cancelled_by else 0
        if orig.consumed - row.gross > captured:
            return self._flag(
                row, "refund_exceeds_captured",
                f"refund of {-row.gross} + {orig.consumed} refunded exceeds the {captured} "
                f"captured by {orig.txn_id}",
            )  # fmt: skip
        orig.consumed, orig.dirty = orig.consumed - row.gross, True
        return self._apply(row)

    def _apply(self, row: _Row, cancels: _Row | None = None) -> None:
        row.effect, row.dirty = "applied", True
        rule, zone = self.rules.get(row.merchant_id) or self._rule(row.merchant_id)
        row.available_at = rule.available_at(row.occurred_at, zone)
        bal = self._balance(row.merchant_id, row.currency)
        if rule.kind == "instant":
            row.released = True
            bal[1] += row.net
        else:
            row.released = False
            bal[0] += row.net
        t = row.txn_type
        if t in ("sale", "capture"):
            bal[3] += row.gross
        elif t == "refund":
            bal[4] -= row.gross
        elif cancels is not None:  # void / reversal
            if cancels.txn_type == "refund":
                bal[4] += cancels.gross
            elif cancels.txn_type in ("sale", "capture"):
                bal[3] -= cancels.gross
            parent = self._row(cancels.original_txn_id) if cancels.original_txn_id else None
            if parent is not None:  # the cancelled refund/capture no longer counts
                parent.consumed, parent.dirty = parent.consumed - abs(cancels.gross), True
        self._event(row, row.txn_type, row.net)

    def _no_money(self, row: _Row) -> None:
        row.effect, row.dirty = "no_money", True
        if row.txn_type not in ("void", "reversal"):
            row.fee, row.net = 0, 0

    def _flag(self, row: _Row, kind: IntegrityKind, message: str) -> None:
        row.effect, row.flag_reason, row.dirty = "flagged", kind, True
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

    def _event(self, row: _Row, kind: str, amount: int) -> None:
        bal = self._balance(row.merchant_id, row.currency)
        self.touched.add((row.merchant_id, row.currency))
        self.pending_events.append(
            PendingEvent(
                row.merchant_id, row.txn_id, kind, row.currency, amount,
                (bal[0], bal[1], bal[2]), row.occurred_at, row.received_at,
            )
        )  # fmt: skip

    def _wake(self, txn_id: str) -> None:
        """Settle, in arrival order, the children that waited for ``txn_id``."""
        if txn_id not in self.children_loaded:
            self._load_children([txn_id])
        for child in self.waiting.pop(txn_id, []):
            self._decide(child)

    # --- loading ---------------------------------------------------------------------------

    def _row(self, txn_id: str) -> _Row | None:
        if txn_id not in self.rows and txn_id not in self.missing:
            self._load_rows({txn_id})
        return self.rows.get(txn_id)

    def _load_rows(self, ids: set[str]) -> None:
        if not ids:
            return
        for r in self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger_entries WHERE txn_id = ANY(%s) FOR UPDATE",  # noqa: S608
            [sorted(ids)],
        ).fetchall():
            self.rows[str(r[0])] = _Row.load(r)
        self.missing |= ids - set(self.rows)

    def _load_children(self, ids: list[str]) -> None:
        ids = [i for i in ids if i not in self.children_loaded]
        if not ids:
            return
        self.children_loaded.update(ids)
        found: dict[str, list[_Row]] = defaultdict(list)
        for r in self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger_entries"  # noqa: S608
            " WHERE effect = 'parked' AND original_txn_id = ANY(%s) ORDER BY entry_id FOR UPDATE",
            [ids],
        ).fetchall():
            row = self.rows.setdefault(str(r[0]), _Row.load(r))  # maybe loaded as an original
            queued = {w.txn_id for w in self.waiting.get(str(r[8]), [])}
            if row.entry is None and row.effect == "parked" and row.txn_id not in queued:
                found[str(r[8])].append(row)
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
        if not keys:
            return
        ordered = sorted(keys)
        self.conn.execute(
            """
            INSERT INTO merchant_balances (merchant_id, currency)
            SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING
            """,
            [[m for m, _ in ordered], [c for _, c in ordered]],
        )
        # Row locks in a fixed order: concurrent writers never deadlock on balances.
        for m, c, p, a, o, cap, ref in self.conn.execute(
            """
            SELECT merchant_id, currency, pending_minor, available_minor, paid_out_minor,
                   captured_minor, refunded_minor
              FROM merchant_balances
             WHERE (merchant_id, currency) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
             ORDER BY merchant_id, currency
               FOR UPDATE
            """,
            [[m for m, _ in ordered], [c for _, c in ordered]],
        ).fetchall():
            self.balances[(str(m), str(c).strip())] = [int(p), int(a), int(o), int(cap), int(ref)]

    def _balance(self, merchant: str, currency: str) -> list[int]:
        if (merchant, currency) not in self.balances:
            self._lock_balances({(merchant, currency)})
        return self.balances[(merchant, currency)]

    # --- writing -----------------------------------------------------------------------------

    def flush(self) -> None:
        new = [r for r in self.rows.values() if r.entry is not None]
        old = [r for r in self.rows.values() if r.entry is None and r.dirty]
        if new:
            self._insert(new)
        if old:
            self._update(old)
        if self.touched:
            keys = sorted(self.touched)
            self.conn.execute(
                """
                UPDATE merchant_balances b SET pending_minor = u.p, available_minor = u.a,
                       captured_minor = u.cap, refunded_minor = u.ref, updated_at = now()
                  FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[],
                              %s::bigint[]) AS u(merchant_id, currency, p, a, cap, ref)
                 WHERE b.merchant_id = u.merchant_id AND b.currency = u.currency
                """,
                [
                    [m for m, _ in keys], [c for _, c in keys],
                    [self.balances[k][0] for k in keys], [self.balances[k][1] for k in keys],
                    [self.balances[k][3] for k in keys], [self.balances[k][4] for k in keys],
                ],
            )  # fmt: skip
        self.result.events = append_cashflow_events(self.conn, self.pending_events)
        self.result.integrity = store_integrity_events(self.conn, self.integrity)

    def _insert(self, rows: list[_Row]) -> None:
        entries = [r.entry for r in rows if r.entry is not None]
        self.conn.execute(
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

    def _update(self, rows: list[_Row]) -> None:
        self.conn.execute(
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
