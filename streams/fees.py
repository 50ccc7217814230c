"""Fee math: a merchant's fee plan applied to one payment, in integer arithmetic.

``fee = round_half_even(gross x percent / 100) + fixed``, at most ``gross``, where
``gross = amount + tip`` in minor units and ``percent`` is the plan's exact decimal
string (never a float): the product is an exact fraction of two integers, rounded
half-to-even to the minor unit (1.5 -> 2, 2.5 -> 2).
"""

from __future__ import annotations

from posflow.contracts.money import FeePlan

__all__ = ["fee_minor", "round_half_even"]


def round_half_even(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded to the nearest integer, ties to even."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def fee_minor(plan: FeePlan, *, gross: int, currency: str, scheme: str, entry_mode: str) -> int:
    """The fee of a sale or capture of ``gross`` minor units (0 for a zero amount)."""
    if gross <= 0:
        return 0
    rule = plan.rule_for(scheme, entry_mode)
    numerator, denominator = rule.rate()
    fee = round_half_even(gross * numerator, denominator) + rule.fixed(currency)
    return min(fee, gross)
