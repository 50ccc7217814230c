"""Money contracts (v1): fee plans, settlement rules, cash-flow and integrity events.

* :class:`FeePlan` and :class:`SettlementRule` are what ``merchants.fee_plan`` and
  ``merchants.settlement_rule`` hold (and what ``posflow settlement set-plan`` reads).
* :class:`CashflowRecord` is a record of Kafka topic ``pos.cashflow.v1`` (key: merchant
  id), one per row of ``cashflow_events``. Published after the database commit, so
  at least once: consumers dedupe by ``(merchant_id, seq)``.
* :class:`IntegrityEvent` is a record of ``pos.integrity.v1`` (key: merchant id): a
  transaction id reused with another body, or a refund/capture/void that was recorded
  and flagged instead of applied. Also at least once: dedupe by ``event_id``.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from posflow.contracts._common import Id, JsonContract, JsonRecord, Model, UtcDatetime, Version
from posflow.contracts.terminal import Currency

__all__ = [
    "CashflowRecord",
    "FeePlan",
    "FeeRule",
    "IntegrityEvent",
    "IntegrityKind",
    "SettlementRule",
]

Scheme = Literal["visa", "mastercard", "amex", "discover", "jcb", "unionpay", "maestro", "other"]
EntryMode = Literal["chip", "contactless", "swipe", "manual", "wallet"]
_PERCENT = re.compile(r"^[0-9]{1,2}(\.[0-9]{1,6})?$")


class FeeRule(Model):
    """Percentage plus fixed fee; ``scheme`` / ``entry_mode`` None match any."""

    scheme: Scheme | None = None
    entry_mode: EntryMode | None = None
    percent: str = Field(
        default="0",
        description="decimal string, e.g. '1.4' = 1.4 % (up to 6 decimals; never a float)",
    )
    fixed_minor: int = Field(default=0, ge=0, le=10**9, description="minor units per payment")
    fixed_by_currency: dict[Currency, Annotated[int, Field(ge=0, le=10**9)]] = Field(
        default_factory=dict, description="fixed fee per currency, overrides fixed_minor"
    )

    @field_validator("percent")
    @classmethod
    def _percent_is_exact(cls, value: str) -> str:
        if _PERCENT.fullmatch(value) is None:
            raise ValueError(
                f"percent {value[:20]!r} must be a decimal string between 0 and 99.999999, "
                "e.g. '1.4'"
            )
        return value

    def rate(self) -> tuple[int, int]:
        """The percentage as an exact fraction of the amount: (numerator, denominator)."""
        try:
            numerator, exponent = _as_integer_ratio(Decimal(self.percent))
        except InvalidOperation:  # pragma: no cover - the validator already refused it
            raise ValueError(self.percent) from None
        return numerator, 100 * 10**exponent

    def fixed(self, currency: str) -> int:
        return self.fixed_by_currency.get(currency, self.fixed_minor)


def _as_integer_ratio(value: Decimal) -> tuple[int, int]:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN / infinity: refused by the validator already
        raise TypeError(f"not a finite decimal: {value}")
    number = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent >= 0:
        return number * 10**exponent, 0
    return number, -exponent


class FeePlan(JsonContract):
    """A merchant's pricing: the first matching rule wins, else ``default``."""

    contract_name = "fee plan v1"

    v: Version = 1
    default: FeeRule = FeeRule()
    rules: list[FeeRule] = Field(default_factory=list, max_length=200)

    def rule_for(self, scheme: str, entry_mode: str) -> FeeRule:
        for rule in self.rules:
            if rule.scheme in (None, scheme) and rule.entry_mode in (None, entry_mode):
                return rule
        return self.default


class SettlementRule(JsonContract):
    """When pending money becomes available: at once, or at a daily cut-off.

    ``daily``: an entry becomes available at the first cut-off strictly after the
    payment's time, in ``timezone`` (default: the merchant's time zone).
    """

    contract_name = "settlement rule v1"

    kind: Literal["instant", "daily"] = "instant"
    cutoff: str = Field(default="00:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone {value[:40]!r}: use an IANA name like 'Europe/Berlin'"
                ) from None
        return value

    def available_at(self, occurred_at: datetime, merchant_timezone: str = "UTC") -> datetime:
        """When money of a payment made at ``occurred_at`` becomes available."""
        if self.kind == "instant":
            return occurred_at
        zone = ZoneInfo(self.timezone or merchant_timezone)
        local = occurred_at.astimezone(zone)
        hour, minute = (int(x) for x in self.cutoff.split(":"))
        day = local.date()
        for _ in range(3):  # today's cut-off, else tomorrow's (DST gaps resolve forward)
            candidate = datetime.combine(day, time(hour, minute), tzinfo=zone)
            if candidate > local:
                return candidate
            day += timedelta(days=1)
        raise AssertionError("unreachable: a cut-off exists within two days")


class CashflowRecord(JsonRecord):
    """One cash-flow event of a merchant (``pos.cashflow.v1``); ``seq`` only grows."""

    contract_name = "cash-flow record v1"

    v: Version = 1
    merchant_id: Id
    seq: int = Field(ge=1)
    txn_id: str | None
    kind: str = Field(
        description="sale capture refund void reversal (money moved), flagged, release, payout"
    )
    currency: Currency
    amount_minor: int = Field(description="signed change of the merchant's money, minor units")
    pending_minor: int
    available_minor: int
    paid_out_minor: int
    occurred_at: UtcDatetime


IntegrityKind = Literal[
    "txn_id_conflict",
    "refund_exceeds_captured",
    "capture_exceeds_authorized",
    "original_invalid",
]


class IntegrityEvent(JsonRecord):
    """Something in the money flow a person must look at (``pos.integrity.v1``)."""

    contract_name = "integrity event v1"

    v: Version = 1
    event_id: str = Field(description="stable id: the same finding always has the same id")
    kind: IntegrityKind
    severity: Literal["warning", "critical"]
    merchant_id: Id
    txn_id: str
    original_txn_id: str | None = None
    currency: Currency | None = None
    amount_minor: int | None = Field(default=None, description="the amount not applied")
    body_sha256: str | None = Field(default=None, description="the refused body's fingerprint")
    first_body_sha256: str | None = Field(default=None, description="the ledger's body")
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    message: str
    detected_at: UtcDatetime
