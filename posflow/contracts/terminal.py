"""What a terminal publishes: the telemetry, transaction and status payloads (contract v1).

Each payload repeats its identity (merchant, terminal, kind) so a message is
self-describing; the ingest bridge checks it against the topic. Money is an
integer number of minor units with an ISO 4217 currency; card data never
appears beyond scheme, last four digits and a token.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AfterValidator, AwareDatetime, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from posflow.contracts._common import Id, Model, Version
from posflow.contracts.cardguard import find_card_data

__all__ = [
    "ISO_4217_CODES",
    "MAX_AMOUNT_MINOR",
    "NEEDS_ORIGINAL",
    "NO_ORIGINAL",
    "Battery",
    "Location",
    "Printer",
    "Signal",
    "Status",
    "Telemetry",
    "TerminalPayload",
    "Transaction",
]

# Active ISO 4217 alphabetic codes (list maintained by SIX, as of 2026), funds and special
# codes included. Withdrawn: ANG (-> XCG, 2025), BGN (euro, 2026), HRK, SLL, ZWL, CUC.
_ISO_4217 = """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP
    BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN
    ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK
    JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD
    MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP
    PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP
    SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV
    WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA XXX YER ZAR ZMW
    ZWG
"""
ISO_4217_CODES = frozenset(_ISO_4217.split())
MAX_AMOUNT_MINOR = 10**12


def _known_currency(code: str) -> str:
    if code not in ISO_4217_CODES:
        raise PydanticCustomError(
            "unknown_currency",
            "unknown currency {code}: use an upper-case ISO 4217 code such as 'EUR' or 'USD'",
            {"code": repr(code)[:12]},
        )
    return code


Currency = Annotated[
    str,
    AfterValidator(_known_currency),
    Field(
        description="ISO 4217 alphabetic currency code",
        json_schema_extra={"enum": sorted(ISO_4217_CODES)},
    ),
]
Money = Annotated[
    int,
    Field(ge=0, le=MAX_AMOUNT_MINOR, description="integer minor units (cents), never a float"),
]
ShortText = Annotated[str, Field(min_length=1, max_length=64)]


class _Payload(Model):
    """Identity and ordering fields every terminal payload starts with."""

    v: Version = Field(description="contract version")
    kind: str = Field(description="message kind; equals the topic's last segment")
    merchant_id: Id = Field(description="equals the topic's merchant segment")
    terminal_id: Id = Field(description="equals the topic's terminal segment")
    ts: AwareDatetime = Field(description="terminal clock, RFC 3339 with a UTC offset")
    seq: int = Field(ge=0, description="per-terminal sequence number, increasing")


class Battery(Model):
    level_pct: int = Field(ge=0, le=100)
    charging: bool
    temperature_c: float = Field(ge=-40, le=100)
    health: Literal["good", "fair", "poor", "unknown"]


class Signal(Model):
    type: Literal["lte", "5g", "3g", "2g", "wifi", "ethernet", "none"]
    rssi_dbm: Annotated[int, Field(ge=-150, le=0)] | None = None
    rsrp_dbm: Annotated[int, Field(ge=-156, le=-31)] | None = None
    sinr_db: Annotated[float, Field(ge=-20, le=40)] | None = None
    wifi_rssi_dbm: Annotated[int, Field(ge=-100, le=0)] | None = None
    carrier: Annotated[str, Field(max_length=64)] | None = None


class Printer(Model):
    paper: Literal["ok", "low", "out", "jammed", "absent"]


class Location(Model):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    accuracy_m: float = Field(ge=0)


class Telemetry(_Payload):
    """Periodic health report, published on pos/v1/{merchant_id}/{terminal_id}/telemetry."""

    kind: Literal["telemetry"] = Field(description="message kind; equals the topic's last segment")
    battery: Battery
    signal: Signal
    printer: Printer
    location: Location | None = None
    app_version: ShortText
    firmware_version: ShortText
    uptime_s: int = Field(ge=0)
    tamper: bool
    heartbeat_interval_s: int = Field(default=30, ge=1, le=3600)


TxnType = Literal["sale", "refund", "void", "preauth", "capture", "reversal"]
# Types that act on an earlier transaction, and those that never do; a refund may be either.
NEEDS_ORIGINAL = frozenset({"void", "capture", "reversal"})
NO_ORIGINAL = frozenset({"sale", "preauth"})


class Transaction(_Payload):
    """A payment outcome, published on pos/v1/{merchant_id}/{terminal_id}/txn.

    Never card data: scheme, entry mode, last four digits and a token at most.
    """

    kind: Literal["txn"] = Field(description="message kind; equals the topic's last segment")
    txn_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    type: TxnType
    amount_minor: Money
    tip_minor: Money = 0
    currency: Currency
    status: Literal["approved", "declined", "error", "timeout"]
    decline_code: Annotated[str, Field(max_length=8)] | None = None
    auth_latency_ms: int = Field(ge=0, le=600_000)
    scheme: Literal["visa", "mastercard", "amex", "discover", "jcb", "unionpay", "maestro", "other"]
    entry_mode: Literal["chip", "contactless", "swipe", "manual", "wallet"]
    card_last4: Annotated[str, Field(pattern=r"^[0-9]{4}$")] | None = None
    card_token: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="scheme or acquirer token; must not be a card number"
    )
    original_txn_id: (
        Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")] | None
    ) = Field(default=None, description="for void, capture, reversal (and refund)")

    @field_validator("card_token")
    @classmethod
    def _token_is_not_card_data(cls, token: str | None) -> str | None:
        if token is not None and (found := find_card_data(token)) is not None:
            raise PydanticCustomError(
                "card_data", "holds {found}; send a token, never card data", {"found": found}
            )
        return token

    @model_validator(mode="after")
    def _original_matches_type(self) -> Self:
        if self.original_txn_id is None and self.type in NEEDS_ORIGINAL:
            raise PydanticCustomError(
                "missing_related_field",
                "is required for a {type}: the txn_id it acts on",
                {"field": "original_txn_id", "type": self.type},
            )
        if self.original_txn_id is not None and self.type in NO_ORIGINAL:
            raise PydanticCustomError(
                "unexpected_related_field",
                "must be null for a {type}, which acts on no earlier transaction",
                {"field": "original_txn_id", "type": self.type},
            )
        return self


class Status(_Payload):
    """Online/offline, retained on pos/v1/{merchant_id}/{terminal_id}/status.

    The terminal sets "offline" as its MQTT Last Will.
    """

    kind: Literal["status"] = Field(description="message kind; equals the topic's last segment")
    state: Literal["online", "offline"]
    reason: Annotated[str, Field(max_length=128)] | None = None


TerminalPayload = Telemetry | Transaction | Status
