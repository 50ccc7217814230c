"""The ledger's settlement rules as pure functions: decided and posted without a database."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posflow.storage.ledger_rules import (
    Arrival,
    Balance,
    Decision,
    Effect,
    Payment,
    arrival,
    decide,
    needs_original,
    post,
)

EUR = Balance("EUR")


def pay(txn_type: str, gross: int = 0, *, fee: int = 0, **kw: object) -> Payment:
    """A new row as the ledger builds it: refunds post -amount, cancellations the original's."""
    if txn_type == "refund":
        gross, fee = -abs(gross), 0
    values: dict[str, object] = {
        "txn_id": f"t-{txn_type}",
        "merchant_id": "m-1",
        "txn_type": txn_type,
        "status": "approved",
        "currency": "EUR",
        "gross": gross,
        "fee": fee,
        "net": gross - fee,
        **kw,
    }
    return Payment(**values)  # type: ignore[arg-type]


def decided(txn_type: str, gross: int, **kw: object) -> Payment:
    """An original already in the ledger, applied unless said otherwise."""
    changes: dict[str, object] = {"effect": "applied", **kw}
    return replace(pay(txn_type, gross, txn_id=f"o-{txn_type}"), **changes)  # type: ignore[arg-type]


# --- arrival ---------------------------------------------------------------------------------


def test_an_id_seen_for_the_first_time_is_new() -> None:
    assert arrival(None, "abc") is Arrival.NEW


def test_the_same_body_again_is_a_duplicate_and_another_body_a_conflict() -> None:
    assert arrival("abc", "abc") is Arrival.DUPLICATE
    assert arrival("abc", "abd") is Arrival.CONFLICT


# --- outcomes --------------------------------------------------------------------------------


def test_an_approved_sale_is_applied_as_it_is() -> None:
    assert decide(pay("sale", 1000, fee=24), EUR) == Decision(Effect.APPLIED)


@pytest.mark.parametrize("status", ["declined", "error", "timeout"])
def test_a_transaction_that_was_not_approved_moves_no_money_and_keeps_no_fee(status: str) -> None:
    decision = decide(pay("sale", 1000, fee=24, status=status), EUR)
    assert decision == Decision(Effect.NO_MONEY, amounts=(1000, 0, 0))
    assert not needs_original(pay("refund", 5, status=status, original_txn_id="o-sale"))


def test_a_preauth_reserves_no_money() -> None:
    assert decide(pay("preauth", 500), EUR) == Decision(Effect.NO_MONEY, amounts=(500, 0, 0))


def test_an_unlinked_refund_of_exactly_what_was_captured_is_applied() -> None:
    balance = Balance("EUR", captured=1000, refunded=400)
    assert balance.refundable == 600
    assert decide(pay("refund", 600), balance) == Decision(Effect.APPLIED)


def test_an_unlinked_refund_one_minor_unit_over_the_captured_is_flagged() -> None:
    decision = decide(pay("refund", 601), Balance("EUR", captured=1000, refunded=400))
    assert decision == Decision(
        Effect.FLAGGED,
        "refund_exceeds_captured",
        "unlinked refund of 601 exceeds the merchant's captured minus refunded 600 EUR",
    )


@pytest.mark.parametrize("txn_type", ["void", "reversal", "capture"])
def test_a_child_without_an_original_is_refused(txn_type: str) -> None:
    decision = decide(pay(txn_type, 0), EUR)
    assert decision.effect is Effect.FLAGGED
    assert (decision.reason, decision.message) == (
        "original_invalid",
        f"a {txn_type} needs original_txn_id",
    )


@pytest.mark.parametrize("original_effect", [None, "parked", ""])
def test_a_child_whose_original_has_not_been_decided_is_parked(original_effect: str | None) -> None:
    refund = pay("refund", 100, original_txn_id="o-sale")
    assert needs_original(refund)
    original = None if original_effect is None else decided("sale", 1000, effect=original_effect)
    assert decide(refund, EUR, original) == Decision(Effect.PARKED)


def test_a_child_against_another_merchants_or_currencys_original_is_refused() -> None:
    refund = pay("refund", 100, original_txn_id="o-sale")
    other_merchant = decided("sale", 1000, merchant_id="m-2")
    other_currency = decided("sale", 1000, currency="USD")
    assert decide(refund, EUR, other_merchant) == Decision(
        Effect.FLAGGED, "original_invalid", "original o-sale belongs to m-2/EUR"
    )
    assert decide(refund, EUR, other_currency) == Decision(
        Effect.FLAGGED, "original_invalid", "original o-sale belongs to m-1/USD"
    )


def test_a_void_gives_back_the_whole_applied_original_fee_included() -> None:
    void = pay("void", original_txn_id="o-sale")
    assert decide(void, EUR, decided("sale", 1000, fee=24, net=976)) == Decision(
        Effect.APPLIED, cancels=True, amounts=(-1000, -24, -976)
    )


def test_a_void_of_an_original_that_moved_nothing_cancels_it_and_moves_nothing() -> None:
    void = pay("reversal", original_txn_id="o-sale")
    declined = decided("sale", 1000, effect="no_money", status="declined")
    assert decide(void, EUR, declined) == Decision(Effect.NO_MONEY, cancels=True)


@pytest.mark.parametrize(
    ("original", "message"),
    [
        (decided("void", 0), "o-void is itself a void"),
        (decided("sale", 1000, cancelled_by="t-9"), "o-sale already cancelled by t-9"),
        (
            decided("sale", 1000, consumed=1),
            "o-sale has 1 refunded/captured against it: cancel those first",
        ),
    ],
)
def test_a_void_is_refused_when_its_original_cannot_be_cancelled(
    original: Payment, message: str
) -> None:
    void = pay("void", original_txn_id=original.txn_id)
    assert decide(void, EUR, original) == Decision(Effect.FLAGGED, "original_invalid", message)


def test_a_capture_of_exactly_the_authorised_rest_is_applied_and_consumes_it() -> None:
    preauth = decided("preauth", 1000, effect="no_money", consumed=300)
    capture = pay("capture", 700, original_txn_id="o-preauth")
    assert decide(capture, EUR, preauth) == Decision(Effect.APPLIED, consumes=700)


def test_a_capture_one_minor_unit_over_the_authorised_is_flagged() -> None:
    preauth = decided("preauth", 1000, effect="no_money", consumed=300)
    capture = pay("capture", 701, original_txn_id="o-preauth")
    assert decide(capture, EUR, preauth) == Decision(
        Effect.FLAGGED,
        "capture_exceeds_authorized",
        "capture of 701 + 300 captured exceeds the 1000 authorised by o-preauth",
    )


def test_a_capture_of_a_cancelled_preauth_or_of_a_sale_is_refused() -> None:
    capture = pay("capture", 1, original_txn_id="o-preauth")
    cancelled = decided("preauth", 1000, effect="no_money", cancelled_by="t-void")
    assert decide(capture, EUR, cancelled).reason == "capture_exceeds_authorized"
    assert decide(capture, EUR, decided("sale", 1000)) == Decision(
        Effect.FLAGGED, "original_invalid", "o-sale is not a preauth"
    )


def test_a_linked_refund_of_exactly_the_rest_captured_is_applied_and_consumes_it() -> None:
    refund = pay("refund", 600, original_txn_id="o-sale")
    sale = decided("sale", 1000, consumed=400)
    assert decide(refund, EUR, sale) == Decision(Effect.APPLIED, consumes=600)


def test_a_linked_refund_one_minor_unit_over_its_original_is_flagged() -> None:
    refund = pay("refund", 601, original_txn_id="o-sale")
    assert decide(refund, EUR, decided("sale", 1000, consumed=400)) == Decision(
        Effect.FLAGGED,
        "refund_exceeds_captured",
        "refund of 601 + 400 refunded exceeds the 1000 captured by o-sale",
    )


def test_a_linked_refund_of_a_cancelled_or_unapplied_sale_has_nothing_to_give_back() -> None:
    refund = pay("refund", 1, original_txn_id="o-sale")
    for sale in (
        decided("sale", 1000, cancelled_by="t-void"),
        decided("sale", 1000, effect="flagged"),
    ):
        decision = decide(refund, EUR, sale)
        assert decision.reason == "refund_exceeds_captured"
        assert decision.message.endswith("exceeds the 0 captured by o-sale")


def test_a_linked_refund_of_a_preauth_is_refused() -> None:
    refund = pay("refund", 1, original_txn_id="o-preauth")
    preauth = decided("preauth", 1000, effect="no_money")
    assert decide(refund, EUR, preauth) == Decision(
        Effect.FLAGGED, "original_invalid", "o-preauth is a preauth"
    )


# --- moving the balance ----------------------------------------------------------------------


def test_a_sale_posts_its_net_to_pending_or_at_once_to_available_and_counts_as_captured() -> None:
    sale = pay("sale", 1000, fee=24)
    assert post(EUR, sale, instant=False) == Balance("EUR", pending=976, captured=1000)
    assert post(EUR, sale, instant=True) == Balance("EUR", available=976, captured=1000)


def test_a_refund_takes_its_amount_back_and_counts_as_refunded() -> None:
    balance = Balance("EUR", available=976, captured=1000)
    after = post(balance, pay("refund", 300), instant=True)
    assert after == Balance("EUR", available=676, captured=1000, refunded=300)


def test_a_void_takes_back_what_its_original_posted_and_uncounts_it() -> None:
    sale = decided("sale", 1000, fee=24, net=976)
    void = replace(pay("void"), gross=-1000, fee=-24, net=-976)
    after = post(Balance("EUR", pending=976, captured=1000), void, instant=False, cancelled=sale)
    assert after == EUR
    refund = decided("refund", 300)
    void_refund = replace(pay("void"), gross=300, net=300)
    before = Balance("EUR", available=676, captured=1000, refunded=300)
    after = post(before, void_refund, instant=True, cancelled=refund)
    assert after == Balance("EUR", available=976, captured=1000)


def test_release_and_payout_move_money_between_the_totals_a_cashflow_event_reports() -> None:
    balance = Balance("EUR", pending=500, available=100, paid_out=7, captured=900)
    assert balance.release(500).cashflow() == (0, 600, 7)
    assert balance.release(500).pay_out(600) == Balance("EUR", paid_out=607, captured=900)


# --- properties over sequences -----------------------------------------------------------------


@dataclass
class _Ledger:
    """A one-merchant ledger in memory, settled with the rules alone."""

    instant: bool
    balance: Balance = EUR
    rows: dict[str, Payment] = field(default_factory=dict)

    def settle(self, payment: Payment) -> Decision:
        orig = self.rows.get(str(payment.original_txn_id)) if needs_original(payment) else None
        decision = decide(payment, self.balance, orig)
        if orig is not None and decision.cancels:
            orig = self.rows[orig.txn_id] = replace(orig, cancelled_by=payment.txn_id)
        if orig is not None and decision.consumes is not None:
            consumed = orig.consumed + decision.consumes
            orig = self.rows[orig.txn_id] = replace(orig, consumed=consumed)
        if decision.amounts is not None:
            gross, fee, net = decision.amounts
            payment = replace(payment, gross=gross, fee=fee, net=net)
        payment = self.rows[payment.txn_id] = replace(payment, effect=decision.effect.value)
        if decision.effect is Effect.APPLIED:
            cancelled = orig if decision.cancels else None
            self.balance = post(self.balance, payment, instant=self.instant, cancelled=cancelled)
            parent = self.rows.get(str(cancelled.original_txn_id)) if cancelled else None
            if cancelled is not None and parent is not None:
                uncounted = parent.consumed - abs(cancelled.gross)
                self.rows[parent.txn_id] = replace(parent, consumed=uncounted)
        return decision

    def limit(self, row: Payment) -> int:
        """What may be consumed of ``row``: refunded of a sale/capture, captured of a preauth."""
        if row.txn_type == "preauth":
            live = row.status == "approved"
        else:
            live = row.effect == Effect.APPLIED
        return row.gross if live and not row.cancelled_by else 0


_OPS = st.tuples(
    st.sampled_from(["sale", "refund", "refund", "preauth", "capture", "void", "reversal"]),
    st.integers(1, 5000),  # amount
    st.integers(0, 100),  # fee, percent of the amount
    st.one_of(st.none(), st.integers(0, 10**6)),  # which earlier row it refers to, if any
    st.booleans(),  # approved
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_OPS, max_size=40), st.booleans())
def test_refunds_and_captures_never_exceed_what_their_originals_allow(
    ops: list[tuple[str, int, int, int | None, bool]], instant: bool
) -> None:
    ledger = _Ledger(instant)
    for n, (kind, amount, percent, link, approved) in enumerate(ops):
        earlier = list(ledger.rows)
        # The contract refuses an original for a sale or a preauth.
        linked = None if kind in ("sale", "preauth") else link
        original = earlier[linked % len(earlier)] if linked is not None and earlier else None
        if kind in ("capture", "void", "reversal") and original is None and linked is not None:
            original = "never-arrives"  # parked for good
        gross = 0 if kind in ("void", "reversal") else amount
        payment = pay(
            kind, gross, fee=gross * percent // 100 if kind != "refund" else 0, txn_id=f"t{n}",
            status="approved" if approved else "declined", original_txn_id=original,
        )  # fmt: skip
        before = ledger.balance
        decision = ledger.settle(payment)

        if decision.effect is not Effect.APPLIED:  # recorded only: no money moves
            assert ledger.balance == before
        if decision.effect is Effect.APPLIED and kind == "refund" and original is None:
            assert ledger.balance.refunded <= ledger.balance.captured
        assert ledger.balance.captured >= 0
        assert ledger.balance.refunded >= 0
        for row in ledger.rows.values():
            if row.txn_type in ("sale", "capture", "preauth"):
                assert 0 <= row.consumed <= ledger.limit(row), row
        applied = [r.net for r in ledger.rows.values() if r.effect == Effect.APPLIED]
        assert ledger.balance.pending + ledger.balance.available == sum(applied)
        assert (ledger.balance.pending if instant else ledger.balance.available) == 0
