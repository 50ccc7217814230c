"""A straightforward reference of settlement, for the tests to compare the real ledger with.

It replays the delivered transactions one by one in plain Python: the first body of
an id wins, later copies are ignored; fees with ``fractions.Fraction`` and Python's
own half-even ``round``; children wait for their original and run right after it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from posflow.contracts import IngestEnvelope, Kind, Transaction
from posflow.contracts.money import FeePlan

RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def envelope(txn: dict[str, Any], received_at: datetime = RECEIVED) -> IngestEnvelope:
    payload = Transaction.model_validate_json(_json(txn))
    return IngestEnvelope(
        kind=Kind.TXN, merchant_id=payload.merchant_id, terminal_id=payload.terminal_id,
        source_topic=f"pos/v1/{payload.merchant_id}/{payload.terminal_id}/txn",
        received_at=received_at, mqtt_mid=1, payload=payload,
    )  # fmt: skip


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value)


def reference_fee(plan: FeePlan, txn: Transaction) -> int:
    gross = txn.amount_minor + txn.tip_minor
    rule = plan.default
    for r in plan.rules:
        if r.scheme in (None, txn.scheme) and r.entry_mode in (None, txn.entry_mode):
            rule = r
            break
    fixed = rule.fixed_by_currency.get(txn.currency, rule.fixed_minor)
    return min(round(Fraction(gross) * Fraction(rule.percent) / 100) + fixed, gross)


@dataclass
class _State:
    txn: Transaction
    effect: str = ""
    gross: int = 0
    fee: int = 0
    net: int = 0
    consumed: int = 0
    cancelled: bool = False


@dataclass
class Reference:
    plans: dict[str, FeePlan] = field(default_factory=dict)
    state: dict[str, _State] = field(default_factory=dict)
    parked: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    money: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    captured: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    refunded: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def feed(self, txns: list[Transaction]) -> None:
        for txn in txns:
            if txn.txn_id not in self.state:
                self.state[txn.txn_id] = _State(txn)
                self._decide(txn.txn_id)

    def effects(self) -> dict[str, str]:
        return {k: s.effect for k, s in self.state.items()}

    def _decide(self, txn_id: str) -> None:  # noqa: PLR0912 - one branch per rule, on purpose
        s = self.state[txn_id]
        t = s.txn
        key = (t.merchant_id, t.currency)
        amount = t.amount_minor + t.tip_minor
        if t.status != "approved" or t.type == "preauth":
            s.effect, s.gross = "no_money", amount
        elif t.type == "sale":
            self._apply(s, amount, reference_fee(self.plans.get(t.merchant_id, FeePlan()), t))
        elif t.type == "refund" and t.original_txn_id is None:
            if self.refunded[key] + amount <= self.captured[key]:
                self._apply(s, -amount, 0)
            else:
                s.effect = "flagged"
        else:
            assert t.original_txn_id is not None
            o = self.state.get(t.original_txn_id)
            if o is None or o.effect == "parked":
                s.effect = "parked"
                self.parked[t.original_txn_id].append(txn_id)
                return
            ot = o.txn
            if (ot.merchant_id, ot.currency) != key:
                s.effect = "flagged"
            elif t.type in ("void", "reversal"):
                if ot.type in ("void", "reversal") or o.cancelled or o.consumed > 0:
                    s.effect = "flagged"
                else:
                    o.cancelled = True
                    if o.effect != "applied":
                        s.effect = "no_money"
                    else:
                        self._apply(s, -o.gross, -o.fee, cancels=o)
            elif t.type == "capture":
                authorised = o.gross if ot.type == "preauth" and ot.status == "approved" else 0
                if ot.type != "preauth" or o.cancelled or o.consumed + amount > authorised:
                    s.effect = "flagged"
                else:
                    o.consumed += amount
                    plan = self.plans.get(t.merchant_id, FeePlan())
                    self._apply(s, amount, reference_fee(plan, t))
            else:  # linked refund
                captured = o.gross if o.effect == "applied" and not o.cancelled else 0
                if ot.type not in ("sale", "capture") or o.consumed + amount > captured:
                    s.effect = "flagged"
                else:
                    o.consumed += amount
                    self._apply(s, -amount, 0)
        for child in self.parked.pop(txn_id, []):
            self._decide(child)

    def _apply(self, s: _State, gross: int, fee: int, cancels: _State | None = None) -> None:
        t = s.txn
        key = (t.merchant_id, t.currency)
        s.effect, s.gross, s.fee, s.net = "applied", gross, fee, gross - fee
        self.money[key] += s.net
        if t.type in ("sale", "capture"):
            self.captured[key] += gross
        elif t.type == "refund":
            self.refunded[key] += -gross
        elif cancels is not None:
            if cancels.txn.type == "refund":
                self.refunded[key] += cancels.gross
            elif cancels.txn.type in ("sale", "capture"):
                self.captured[key] -= cancels.gross
            parent_id = cancels.txn.original_txn_id
            if parent_id is not None and parent_id in self.state:
                self.state[parent_id].consumed -= abs(cancels.gross)
