"""Fee math, fee plans and settlement rules: pure functions, no services."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posflow.contracts import ContractError
from posflow.contracts.money import FeePlan, FeeRule, IntegrityEvent, SettlementRule
from streams.fees import fee_minor, round_half_even

PLAN = FeePlan.from_json(
    '{"default": {"percent": "1.4", "fixed_minor": 10},'
    ' "rules": [{"scheme": "amex", "percent": "2.9", "fixed_by_currency": {"EUR": 30}},'
    '           {"entry_mode": "manual", "percent": "3.5", "fixed_minor": 20}]}'
)


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [(5, 2, 2), (7, 2, 4), (3, 2, 2), (1, 2, 0), (-5, 2, -2), (-7, 2, -4), (10, 3, 3), (11, 3, 4)],
)
def test_round_half_even_ties_go_to_the_even_neighbour(
    numerator: int, denominator: int, expected: int
) -> None:
    assert round_half_even(numerator, denominator) == expected


@given(st.integers(-(10**15), 10**15), st.integers(1, 10**9))
def test_round_half_even_equals_pythons_exact_rounding(numerator: int, denominator: int) -> None:
    assert round_half_even(numerator, denominator) == round(Fraction(numerator, denominator))


def test_fee_is_percentage_plus_fixed_by_the_first_matching_rule() -> None:
    # 1000 x 1.4 % = 14, + 10 fixed
    assert fee_minor(PLAN, gross=1000, currency="EUR", scheme="visa", entry_mode="chip") == 24
    # amex: 1250 x 2.9 % = 36.25 -> 36, + 30 (EUR fixed)
    assert fee_minor(PLAN, gross=1250, currency="EUR", scheme="amex", entry_mode="chip") == 66
    # amex in USD: no USD fixed fee, fixed_minor 0
    assert fee_minor(PLAN, gross=1250, currency="USD", scheme="amex", entry_mode="chip") == 36
    # the amex rule comes first, even for a manual entry
    assert fee_minor(PLAN, gross=1000, currency="EUR", scheme="amex", entry_mode="manual") == 59
    assert fee_minor(PLAN, gross=1000, currency="EUR", scheme="visa", entry_mode="manual") == 55


def test_fee_rounds_half_to_even_at_the_minor_unit() -> None:
    plan = FeePlan(default=FeeRule(percent="2.5"))
    # 50 x 2.5 % = 1.25 -> 1 ; 60 x 2.5 % = 1.5 -> 2 ; 100 x 2.5 % = 2.5 -> 2
    assert [
        fee_minor(plan, gross=g, currency="EUR", scheme="visa", entry_mode="chip")
        for g in (50, 60, 100, 140)
    ] == [1, 2, 2, 4]


def test_fee_never_exceeds_the_amount_and_a_zero_amount_pays_nothing() -> None:
    plan = FeePlan(default=FeeRule(percent="1", fixed_minor=30))
    assert fee_minor(plan, gross=20, currency="EUR", scheme="visa", entry_mode="chip") == 20
    assert fee_minor(plan, gross=0, currency="EUR", scheme="visa", entry_mode="chip") == 0


@given(st.integers(1, 10**12), st.decimals(min_value=0, max_value=99, places=4))
def test_fee_is_exact_for_any_amount_and_rate(gross: int, percent: object) -> None:
    plan = FeePlan(default=FeeRule(percent=str(percent)))
    expected = min(round(Fraction(gross) * Fraction(str(percent)) / 100), gross)
    assert (
        fee_minor(plan, gross=gross, currency="EUR", scheme="visa", entry_mode="chip") == expected
    )


@pytest.mark.parametrize("percent", ["1.4e2", "-1", "1,4", "100", "0.1234567", "abc", ""])
def test_a_percentage_that_is_not_an_exact_decimal_string_is_refused(percent: str) -> None:
    with pytest.raises(ContractError) as caught:
        FeePlan.from_json('{"default": {"percent": "%s"}}' % percent)  # noqa: UP031
    assert caught.value.field == "default.percent"


def test_a_float_percentage_is_refused_with_the_field_named() -> None:
    with pytest.raises(ContractError) as caught:
        FeePlan.from_json('{"default": {"percent": 1.4}}')
    assert caught.value.field == "default.percent"


def test_instant_money_is_available_when_the_payment_happened() -> None:
    at = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
    assert SettlementRule(kind="instant").available_at(at) == at


@pytest.mark.parametrize(
    ("occurred", "expected"),
    [
        # Berlin is UTC+1 in November: 18:00 local = 17:00 UTC
        (datetime(2026, 11, 23, 16, 59, tzinfo=UTC), datetime(2026, 11, 23, 17, 0, tzinfo=UTC)),
        (datetime(2026, 11, 23, 17, 0, tzinfo=UTC), datetime(2026, 11, 24, 17, 0, tzinfo=UTC)),
        (datetime(2026, 11, 23, 23, 30, tzinfo=UTC), datetime(2026, 11, 24, 17, 0, tzinfo=UTC)),
        # summer time: UTC+2, 18:00 local = 16:00 UTC
        (datetime(2026, 7, 1, 10, 0, tzinfo=UTC), datetime(2026, 7, 1, 16, 0, tzinfo=UTC)),
    ],
)
def test_daily_cutoff_is_the_next_one_in_the_merchants_time_zone(
    occurred: datetime, expected: datetime
) -> None:
    rule = SettlementRule(kind="daily", cutoff="18:00")
    assert rule.available_at(occurred, "Europe/Berlin") == expected
    # the rule's own zone wins over the merchant's
    pinned = SettlementRule(kind="daily", cutoff="18:00", timezone="Europe/Berlin")
    assert pinned.available_at(occurred, "Asia/Tokyo") == expected


def test_an_unknown_time_zone_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ContractError) as caught:
        SettlementRule.from_json('{"kind": "daily", "cutoff": "18:00", "timezone": "Mars/Base"}')
    assert "unknown time zone" in caught.value.message
    assert caught.value.field == "timezone"


def test_integrity_event_round_trips_through_json() -> None:
    event = IntegrityEvent(
        event_id="txn_id_conflict:T-1:abc", kind="txn_id_conflict", severity="critical",
        merchant_id="M-1", txn_id="T-1", currency="EUR", amount_minor=100,
        body_sha256="b" * 64, first_body_sha256="a" * 64, message="reused id",
        detected_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
    )  # fmt: skip
    assert IntegrityEvent.from_json(event.to_json()) == event
