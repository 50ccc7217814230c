"""The settlement rules of the ledger, apart from SQL: what a payment does to the money.

Pure functions over typed values, so every rule can be tested without a database.
:mod:`posflow.storage._ledger_batch` loads the rows and balances under lock, asks
:func:`decide` what a new row does, applies the :class:`Decision` to its rows and
moves the balance with :func:`post`; :mod:`posflow.storage.settlement` moves money
with :meth:`Balance.release` and :meth:`Balance.pay_out`. The semantics are in
:mod:`posflow.storage.ledger`'s docstring and docs/architecture.md (Settlement).

Amounts are integer minor units of the payment's currency. A refund's ``gross`` is
negative (``-amount``), as the ledger stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum, StrEnum

from posflow.contracts.money import IntegrityKind

__all__ = [
    "CANCELLATIONS",
    "Arrival",
    "Balance",
    "Decision",
    "Effect",
    "Payment",
    "arrival",
    "decide",
    "needs_original",
    "post",
]

# The transaction types that cancel their original's whole effect.
CANCELLATIONS = ("void", "reversal")
_CAPTURES = ("sale", "capture")  # the types that capture money a refund may give back


class Effect(StrEnum):
    """What a ledger row does (its ``effect`` column)."""

    APPLIED = "applied"  # moved money
    NO_MONEY = "no_money"  # recorded (its id is taken), nothing moved
    PARKED = "parked"  # waits for its original to arrive
    FLAGGED = "flagged"  # broke a rule: recorded, not applied, an integrity event raised


class Arrival(Enum):
    """A transaction id as it arrives: new, the same body again, or another body."""

    NEW = "new"
    DUPLICATE = "duplicate"  # counted, nothing else
    CONFLICT = "conflict"  # quarantined: the ledger keeps the first body


def arrival(first_fingerprint: str | None, fingerprint: str) -> Arrival:
    """Compare a body's fingerprint with the first one seen for its id (``None``: none)."""
    if first_fingerprint is None:
        return Arrival.NEW
    return Arrival.DUPLICATE if first_fingerprint == fingerprint else Arrival.CONFLICT


@dataclass(frozen=True, slots=True)
class Balance:
    """A merchant's money in one currency (``merchant_balances``), in minor units."""

    currency: str
    pending: int = 0  # applied, waiting for its cut-off
    available: int = 0  # may be paid out
    paid_out: int = 0
    captured: int = 0  # sales and captures applied, minus those cancelled
    refunded: int = 0  # refunds applied (positive), minus those cancelled

    @property
    def refundable(self) -> int:
        """What an unlinked refund may still give back: captured minus refunded."""
        return self.captured - self.refunded

    def cashflow(self) -> tuple[int, int, int]:
        """(pending, available, paid out): the totals a cash-flow event reports."""
        return self.pending, self.available, self.paid_out

    def release(self, amount: int) -> Balance:
        """``amount`` moved from pending to available (its cut-off passed)."""
        return replace(self, pending=self.pending - amount, available=self.available + amount)

    def pay_out(self, amount: int) -> Balance:
        """``amount`` moved from available to paid out (the caller checked it is there)."""
        return replace(self, available=self.available - amount, paid_out=self.paid_out + amount)


@dataclass(slots=True)
class Payment:
    """A ledger row as the rules see it: the new row, or the original it refers to.

    The rules only read it. The ledger batch's rows (``_ledger_tables.Row``) are
    payments plus their storage bookkeeping, changed as the decisions say.
    """

    txn_id: str
    merchant_id: str
    txn_type: str
    status: str
    currency: str
    gross: int
    fee: int = 0
    net: int = 0
    original_txn_id: str | None = None
    effect: str = ""  # "" while not decided yet
    consumed: int = 0  # refunded (of a sale/capture) or captured (of a preauth) against it
    cancelled_by: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a row does, and what it changes on its original.

    ``reason`` and ``message`` say why a row is flagged. ``cancels``: the original is
    cancelled by this row (also when nothing moves). ``consumes``: added to the
    original's consumed amount (``None``: the original's amount is not touched).
    ``amounts``: the row's (gross, fee, net) from now on, when they change.
    """

    effect: Effect
    reason: IntegrityKind | None = None
    message: str = ""
    cancels: bool = False
    consumes: int | None = None
    amounts: tuple[int, int, int] | None = None


def _flag(reason: IntegrityKind, message: str) -> Decision:
    return Decision(Effect.FLAGGED, reason, message)


def needs_original(payment: Payment) -> bool:
    """Whether :func:`decide` needs ``payment``'s original row (load it, locked, first)."""
    return (
        payment.status == "approved"
        and payment.txn_type not in ("sale", "preauth")
        and payment.original_txn_id is not None
    )


def decide(  # noqa: PLR0911 - one rule per return
    payment: Payment, balance: Balance, original: Payment | None = None
) -> Decision:
    """The effect of a new ledger row.

    ``balance`` is the merchant's in the payment's currency; ``original`` the row that
    ``payment.original_txn_id`` names (``None``: not in the ledger), when
    :func:`needs_original` says so.
    """
    t = payment.txn_type
    if payment.status != "approved" or t == "preauth":
        return Decision(Effect.NO_MONEY, amounts=(payment.gross, 0, 0))
    if t == "sale":
        return Decision(Effect.APPLIED)
    if t == "refund" and payment.original_txn_id is None:
        if balance.refunded - payment.gross <= balance.captured:
            return Decision(Effect.APPLIED)
        return _flag(
            "refund_exceeds_captured",
            f"unlinked refund of {-payment.gross} exceeds the merchant's captured minus "
            f"refunded {balance.refundable} {payment.currency}",
        )
    if payment.original_txn_id is None:  # the contract requires one; refuse rather than guess
        return _flag("original_invalid", f"a {t} needs original_txn_id")
    # An original decided "" is later in the same batch: it has not arrived for this row.
    if original is None or original.effect in (Effect.PARKED, ""):
        return Decision(Effect.PARKED)  # settled when its original is
    return _against(payment, original)


def _against(payment: Payment, orig: Payment) -> Decision:  # noqa: PLR0911 - one rule per return
    """A void, reversal, capture or linked refund, against its decided original."""
    t = payment.txn_type
    if orig.merchant_id != payment.merchant_id or orig.currency != payment.currency:
        return _flag(
            "original_invalid",
            f"original {orig.txn_id} belongs to {orig.merchant_id}/{orig.currency}",
        )
    if t in CANCELLATIONS:
        if orig.txn_type in CANCELLATIONS:
            return _flag("original_invalid", f"{orig.txn_id} is itself a {t}")
        if orig.cancelled_by is not None:
            return _flag(
                "original_invalid", f"{orig.txn_id} already cancelled by {orig.cancelled_by}"
            )
        if orig.consumed > 0:
            return _flag(
                "original_invalid",
                f"{orig.txn_id} has {orig.consumed} refunded/captured against it: "
                "cancel those first",
            )
        if orig.effect != Effect.APPLIED:  # nothing moved: nothing to give back
            return Decision(Effect.NO_MONEY, cancels=True)
        return Decision(Effect.APPLIED, cancels=True, amounts=(-orig.gross, -orig.fee, -orig.net))
    if t == "capture":
        if orig.txn_type != "preauth":
            return _flag("original_invalid", f"{orig.txn_id} is not a preauth")
        authorised = orig.gross if orig.status == "approved" and not orig.cancelled_by else 0
        if orig.consumed + payment.gross > authorised:
            return _flag(
                "capture_exceeds_authorized",
                f"capture of {payment.gross} + {orig.consumed} captured exceeds the "
                f"{authorised} authorised by {orig.txn_id}",
            )
        return Decision(Effect.APPLIED, consumes=payment.gross)
    # a linked refund
    if orig.txn_type not in _CAPTURES:
        return _flag("original_invalid", f"{orig.txn_id} is a {orig.txn_type}")
    captured = orig.gross if orig.effect == Effect.APPLIED and not orig.cancelled_by else 0
    if orig.consumed - payment.gross > captured:
        return _flag(
            "refund_exceeds_captured",
            f"refund of {-payment.gross} + {orig.consumed} refunded exceeds the {captured} "
            f"captured by {orig.txn_id}",
        )
    return Decision(Effect.APPLIED, consumes=-payment.gross)


def post(
    balance: Balance, payment: Payment, *, instant: bool, cancelled: Payment | None = None
) -> Balance:
    """The balance after ``payment`` (with its final amounts) is applied.

    Its net goes to available at once under an ``instant`` rule, else to pending;
    ``cancelled`` is the row a void/reversal cancels, whose capture or refund no
    longer counts.
    """
    pending, available = balance.pending, balance.available
    if instant:
        available += payment.net
    else:
        pending += payment.net
    captured, refunded = balance.captured, balance.refunded
    if payment.txn_type in _CAPTURES:
        captured += payment.gross
    elif payment.txn_type == "refund":
        refunded -= payment.gross
    elif cancelled is not None:
        if cancelled.txn_type == "refund":
            refunded += cancelled.gross
        elif cancelled.txn_type in _CAPTURES:
            captured -= cancelled.gross
    return replace(
        balance, pending=pending, available=available, captured=captured, refunded=refunded
    )
